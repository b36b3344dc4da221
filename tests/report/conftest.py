"""Small run directories built with the documented schema, shared by the report tests.

Plain helpers (no fixtures): the test files import them from here, as tests import
``tests.conftest``'s recipes."""

from __future__ import annotations

import base64
import inspect
import json
import random
import re
import textwrap
from pathlib import Path
from pydoc_data.topics import topics

import polars as pl
import pyarrow.parquet as pq

SCRIPT = "<script>alert(1)</script><b>x</b>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS, STEPS = (0, 1), (100, 200)


def _texts(n: int) -> list[str]:
    """Real text: paragraphs of the Python docs' topics and lines of a stdlib module."""
    paras = [p.strip() for v in topics.values() for p in v.split("\n\n") if len(p.strip()) > 40]
    lines = [ln.strip() for ln in inspect.getsource(textwrap).splitlines() if len(ln.strip()) > 20]
    pool = [t for pair in zip(paras, lines, strict=False) for t in pair]
    return [pool[i % len(pool)][:500] for i in range(n)]


def make_run(
    root: Path,
    n: int = 60,
    domains: tuple[str, ...] | None = ("web", "code", "books"),
    labels: tuple[str, ...] | None = ("pos", "neg"),
    nan_rows: int = 0,
    manifest: bool = True,
    keep_fraction: float = 0.7,
) -> Path:
    run = root / "runs" / "demo"
    (run / "scores").mkdir(parents=True)
    rng = random.Random(0)
    ids = [f"row-{i:04d}" for i in range(n)]
    texts = _texts(n)
    if n:
        texts[n // 2] = SCRIPT
    rows = pl.DataFrame(
        {
            "id": ids,
            "domain": [domains[i % len(domains)] if domains else None for i in range(n)],
            "label": [labels[i % len(labels)] if labels else None for i in range(n)],
            "n_tokens": [len(t.split()) for t in texts],
            "preview": texts,
        },
        schema={"id": pl.Utf8, "domain": pl.Utf8, "label": pl.Utf8, "n_tokens": pl.Int64, "preview": pl.Utf8},
    )
    rows.write_parquet(run / "scores" / "rows.parquet")

    base = [rng.random() for _ in range(n)]
    cols: dict[str, list[float]] = {}
    for s in SEEDS:
        for k in STEPS:
            cols[f"el2n@s{s}k{k}"] = [b + 0.1 * rng.random() for b in base]
    mean = [sum(v[i] for v in cols.values()) / len(cols) for i in range(n)]
    for i in range(nan_rows):
        mean[i] = float("nan")
        for v in cols.values():
            v[i] = float("nan")
    table = pl.DataFrame({"id": ids, "el2n": mean, **cols}).to_arrow()
    provenance = {
        "scorer": "el2n",
        "params": {"temperature": 1.0, "note": "<i>not html</i>"},
        "model": {"fingerprint": "m-abc123"},
        "checkpoints": [{"seed": s, "step": k, "fingerprint": f"c{s}{k}"} for s in SEEDS for k in STEPS],
        "version": "0.1.0",
        "created": "2026-01-02T03:04:05+00:00",
    }
    table = table.replace_schema_metadata({"winnow.provenance": json.dumps(provenance)})
    pq.write_table(table, run / "scores" / "el2n.parquet")

    # keep the highest scores; NaN rows are pruned; weights have mean 1 over kept rows
    order = sorted((i for i in range(n) if mean[i] == mean[i]), key=lambda i: -mean[i])
    kept_set = set(order[: round(keep_fraction * len(order))])
    kept = [i in kept_set for i in range(n)]
    raw = [1.0 + mean[i] if kept[i] else 0.0 for i in range(n)]
    total = sum(raw)
    weight = [r * len(kept_set) / total if total else 0.0 for r in raw]
    pl.DataFrame({"id": ids, "kept": kept, "weight": weight}).write_parquet(run / "selection.parquet")

    (run / "config.yaml").write_text(
        "name: demo\nscorers:\n  - name: el2n\nselector:\n  name: prune\n  score: el2n\n"
        f"  keep_fraction: {keep_fraction}\n  keep: hardest\n# comment with <tag> & ampersand\n"
    )
    if manifest:
        n_kept = sum(kept)
        m = {
            "winnow_version": "0.1.0",
            "run": "demo",
            "created": "2026-01-02T03:04:05+00:00",
            "recipe_fingerprint": "r-123",
            "input": {
                "fingerprint": "i-456",
                "shards": [{"path": "data/a.jsonl", "sha256": "f" * 64, "rows": n}],
            },
            "model": {"fingerprint": "m-abc123"},
            "scorers": ["el2n"],
            "selector": {"name": "prune", "score": "el2n", "keep_fraction": keep_fraction},
            "counts": {"input_rows": n, "kept_rows": n_kept, "pruned_rows": n - n_kept},
            "domains": {},
            "labels": {},
            "interleave": {"names": ["web", "code", "books"], "probabilities": [0.5, 0.3, 0.2]},
            "mosaic_streams": [{"name": "web", "proportion": 0.5}],
            "shards": [
                {
                    "path": "shards/data-00000-of-00002.parquet",
                    "rows": n_kept // 2,
                    "bytes": 1234,
                    "sha256": "a1b2c3d4e5f6" + "0" * 52,
                },
                {
                    "path": "shards/data-00001-of-00002.parquet",
                    "rows": n_kept - n_kept // 2,
                    "bytes": 999,
                    "sha256": "ffeeddccbbaa" + "1" * 52,
                },
            ],
            "columns": ["text", "weight"],
            "weight_column": "weight",
        }
        (run / "manifest.json").write_text(json.dumps(m))
    return run


def _img_srcs(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def _check_page(page: str) -> None:
    assert not re.search(r"\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.I)
    assert not re.search(r"<script\b", page, re.I)
    assert not re.search(r"<link\b", page, re.I)
    assert "@import" not in page
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", page, re.I)
    srcs = _img_srcs(page)
    assert srcs, "the report has no plots"
    assert page.count("<img") == len(srcs)
    for src in srcs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :], validate=True).startswith(PNG_MAGIC)


def make_previous(
    run: Path, dest: Path, drop: int = 5, flip_every: int | None = 3, gone_kept: int = 2
) -> Path:
    """A previous version of `run`: its selection with the first `drop` ids missing (new rows now), every
    `flip_every`-th row's kept flag flipped, and `gone_kept` + 1 ids that this run lacks (gone rows,
    all but one kept); its manifest as a copy of the run's."""
    dest.mkdir(parents=True)
    sel = pl.read_parquet(run / "selection.parquet").slice(drop)
    if flip_every:
        sel = sel.with_columns(
            kept=pl.when(pl.int_range(pl.len()) % flip_every == 0)
            .then(~pl.col("kept"))
            .otherwise(pl.col("kept"))
        )
    gone = pl.DataFrame(
        {
            "id": [f"gone-{i}" for i in range(gone_kept + 1)],
            "kept": [True] * gone_kept + [False],
            "weight": [1.0] * gone_kept + [0.0],
        }
    )
    pl.concat([sel, gone]).write_parquet(dest / "selection.parquet")
    if (run / "manifest.json").is_file():
        (dest / "manifest.json").write_bytes((run / "manifest.json").read_bytes())
    return dest

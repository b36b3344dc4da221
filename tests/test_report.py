"""report.html and the terminal summary, on small run directories built with the documented schema."""

from __future__ import annotations

import base64
import inspect
import io
import json
import random
import re
import textwrap
from pathlib import Path
from pydoc_data.topics import topics

import polars as pl
import pyarrow.parquet as pq
import pytest

from winnow.pipeline.report import print_summary, summarize, write_report

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
            "input": {"fingerprint": "i-456", "shards": [{"path": "data/a.jsonl", "sha256": "f" * 64, "rows": n}]},
            "model": {"fingerprint": "m-abc123"},
            "scorers": ["el2n"],
            "selector": {"name": "prune", "score": "el2n", "keep_fraction": keep_fraction},
            "counts": {"input_rows": n, "kept_rows": n_kept, "pruned_rows": n - n_kept},
            "domains": {},
            "labels": {},
            "interleave": {"names": ["web", "code", "books"], "probabilities": [0.5, 0.3, 0.2]},
            "mosaic_streams": [{"name": "web", "proportion": 0.5}],
            "shards": [
                {"path": "shards/data-00000-of-00002.parquet", "rows": n_kept // 2, "bytes": 1234,
                 "sha256": "a1b2c3d4e5f6" + "0" * 52},
                {"path": "shards/data-00001-of-00002.parquet", "rows": n_kept - n_kept // 2, "bytes": 999,
                 "sha256": "ffeeddccbbaa" + "1" * 52},
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
        assert base64.b64decode(src[len(prefix):], validate=True).startswith(PNG_MAGIC)


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "report.html").write_text("an older report")
    out = write_report(run)
    assert out == run / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    _check_page(page)
    assert SCRIPT not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in page
    # recipe and provenance shown, escaped
    assert "# comment with &lt;tag&gt; &amp; ampersand" in page
    assert "&lt;i&gt;not html&lt;/i&gt;" in page and "m-abc123" in page
    # header, manifest shards (sha256 prefix, not the whole digest), interleave, real text previews
    assert "0.1.0" in page and "2026-01-02T03:04:05" in page and "prune" in page
    assert "shards/data-00000-of-00002.parquet" in page and "a1b2c3d4e5f6" in page
    assert "a1b2c3d4e5f6" + "0" * 52 not in page
    assert "interleave" in page.lower() and "0.3" in page
    assert "Spearman" in page
    for anchor in ("scores", "groups", "agreement", "examples", "provenance", "shards"):
        assert f'href="#{anchor}"' in page and f'id="{anchor}"' in page
    assert sorted(p.name for p in run.iterdir() if "report" in p.name) == ["report.html"]


def test_summarize_counts_match_the_data(tmp_path: Path) -> None:
    run = make_run(tmp_path, n=90, nan_rows=4)
    s = summarize(run)
    sel = pl.read_parquet(run / "selection.parquet")
    rows = pl.read_parquet(run / "scores" / "rows.parquet")
    assert s["counts"] == {"input_rows": 90, "kept_rows": sel["kept"].sum(), "pruned_rows": 90 - sel["kept"].sum(),
                           "kept_fraction": sel["kept"].sum() / 90}
    joined = sel.join(rows, on="id")
    for col, key in (("domain", "domains"), ("label", "labels")):
        want = {
            r[col]: (r["n"], r["k"])
            for r in joined.group_by(col).agg(n=pl.len(), k=pl.col("kept").sum()).iter_rows(named=True)
        }
        got = {g: (v["input_rows"], v["kept_rows"]) for g, v in s[key].items()}
        assert got == want
        assert sum(v["proportion_before"] for v in s[key].values()) == pytest.approx(1.0)
        assert sum(v["proportion_after"] for v in s[key].values()) == pytest.approx(1.0)
    assert s["selection_score"] == "el2n" and s["cutoff_side"] == "high"
    el2n = pl.read_parquet(run / "scores" / "el2n.parquet")
    kept_scores = el2n.join(sel, on="id").filter(pl.col("kept") & pl.col("el2n").is_not_nan())["el2n"]
    assert s["cutoff"] <= kept_scores.min()
    assert s["scores"]["el2n"]["nan"] == 4 and s["scores"]["el2n"]["finite"] == 86
    assert s["scores"]["el2n@s1k200"] | {"seed": 1, "step": 200} == s["scores"]["el2n@s1k200"]
    assert s["selection_score_not_finite"] == {"rows": 4, "kept": 0, "pruned": 4}
    assert s["weights"]["mean"] == pytest.approx(1.0)
    a = s["agreement"]["el2n"]
    assert len(a["matrix"]) == 4 and a["rows"] == 86
    assert a["pairs"]["between_seeds_same_step"] > 0.8  # the fixture's checkpoints share one base score
    json.dumps(s)  # JSON-able


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 2, "domains": None, "labels": None},
        {"domains": ("only",), "nan_rows": 5, "manifest": False},
        {"n": 1},
        {"n": 3, "keep_fraction": 1.0},
        {"n": 4, "keep_fraction": 0.0, "nan_rows": 4},
    ],
    ids=["no-groups-two-rows", "one-domain-nan-no-manifest", "one-row", "all-kept", "none-kept-all-nan"],
)
def test_edge_cases_render(tmp_path: Path, kwargs: dict) -> None:
    run = make_run(tmp_path, **kwargs)
    page = write_report(run).read_text(encoding="utf-8")
    _check_page(page)
    s = summarize(run)
    assert s["counts"]["input_rows"] == kwargs.get("n", 60)
    if kwargs.get("domains", ()) is None:
        assert s["domains"] == {} and "no domain column" in page
    if kwargs.get("labels", ()) is None:
        assert s["labels"] == {} and "no label column" in page
    if kwargs.get("domains") == ("only",):
        assert list(s["domains"]) == ["only"]
    if not kwargs.get("manifest", True):
        assert not s["run"]["has_manifest"] and "manifest.json not found" in page
    if kwargs.get("nan_rows"):
        assert f"{kwargs['nan_rows']:,} rows have a NaN" in page
    if kwargs.get("n", 60) < 3:
        assert s["agreement"]["el2n"]["matrix"] is None


def test_missing_inputs_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.*winnow run"):
        write_report(tmp_path / "nope")
    run = make_run(tmp_path)
    (run / "selection.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"selection\.parquet not found.*winnow run"):
        summarize(run)
    for p in (run / "scores").iterdir():
        p.unlink()
    (run / "scores").rmdir()
    with pytest.raises(FileNotFoundError, match="scores not found"):
        write_report(run)
    assert not (run / "report.html").exists()


def test_optional_files_missing(tmp_path: Path) -> None:
    run = make_run(tmp_path, n=10, manifest=False)
    (run / "scores" / "rows.parquet").unlink()
    (run / "config.yaml").unlink()
    s = summarize(run)
    assert s["counts"]["input_rows"] == 10 and s["domains"] == {} and s["labels"] == {}
    assert s["selection_score"] == "el2n" and not s["run"]["has_manifest"]
    assert any("rows.parquet not found" in n for n in s["notes"])


def test_print_summary(tmp_path: Path) -> None:
    from rich.console import Console

    run = make_run(tmp_path, nan_rows=2)
    buf = io.StringIO()
    s = print_summary(run, console=Console(file=buf, width=160))
    text = buf.getvalue()
    assert "demo" in text and f"{s['counts']['kept_rows']:,}" in text
    for word in ("web", "code", "books", "pos", "neg", "el2n", "Spearman"):
        assert word in text

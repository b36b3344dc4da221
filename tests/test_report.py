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
    assert s["counts"] == {
        "input_rows": 90,
        "kept_rows": sel["kept"].sum(),
        "pruned_rows": 90 - sel["kept"].sum(),
        "kept_fraction": sel["kept"].sum() / 90,
    }
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


# --------------------------------------------------------------------------------------------------
# versions: out= and previous=


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


def test_previous_version_changes(tmp_path: Path) -> None:
    run = make_run(tmp_path, keep_fraction=0.5)
    prev = make_previous(run, tmp_path / "runs" / "demo" / "v0001")
    out = write_report(run, fingerprint="fp-1", out=tmp_path / "v0002" / "report.html", previous=prev)
    assert out == tmp_path / "v0002" / "report.html" and out.is_file()
    assert not (run / "report.html").exists()  # out= replaces the default place
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temporary left
    page = out.read_text(encoding="utf-8")
    _check_page(page)
    from winnow.pipeline.report import report_fingerprint

    assert report_fingerprint(out) == "fp-1"
    assert "Changes since v0001" in page
    anchors = re.findall(r'<li><a href="#([^"]+)">', page)
    assert anchors[0] == "changes" and 'id="changes"' in page
    assert page.index('id="changes"') < page.index('id="scores"')

    # the counts, recomputed here from the two selections
    now = pl.read_parquet(run / "selection.parquet")
    was = pl.read_parquet(prev / "selection.parquet")
    j = now.join(was, on="id", how="full", suffix="_was", coalesce=True)
    kept_now, kept_was = pl.col("kept").fill_null(False), pl.col("kept_was")
    entered_pruned = j.filter(kept_now & (kept_was == False)).height  # noqa: E712
    entered_new = j.filter(kept_now & kept_was.is_null()).height
    left_pruned = j.filter((pl.col("kept") == False) & kept_was.fill_null(False)).height  # noqa: E712
    left_gone = j.filter(pl.col("kept").is_null() & kept_was).height
    assert entered_pruned and entered_new and left_pruned and left_gone == 2
    for n, what in (
        (entered_pruned + entered_new, "entered the selection"),
        (left_pruned + left_gone, "left the selection"),
        (5, "new rows"),
        (3, "gone rows"),
    ):
        assert f"<b>{n:,}</b><span>{what}" in page, what
    assert f"<td>entered: new rows, kept now</td><td>{entered_new}</td>" in page
    assert f"<td>left: kept before, pruned now</td><td>{left_pruned}</td>" in page
    # per domain and per label: a table and a chart each; the gone rows' group is unknown here
    for group in ("domain", "label"):
        assert f"Kept rows per {group}, before and after" in page
        assert f'alt="share of kept rows per {group}, v0001 vs this run"' in page
    assert "(not in this run)" in page and "gone-0, gone-1" in page
    # examples of entered and left rows with their (escaped) text and scores
    assert re.search(r"Rows that entered the selection \(\d+; 5 shown, the highest el2n first\)", page)
    assert re.search(r"Rows that left the selection and still in the data \(\d+; 5 shown", page)
    assert "new row</td>" in page and "pruned before</td>" in page and "pruned now</td>" in page


def test_previous_version_missing_files(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    empty = tmp_path / "v0001"
    empty.mkdir()
    page = write_report(run, previous=empty).read_text(encoding="utf-8")
    _check_page(page)
    assert "Changes since v0001" in page
    assert "selection.parquet not found" in page and "manifest.json not found" in page

    only_sel = make_previous(run, tmp_path / "v0002")
    (only_sel / "manifest.json").unlink()
    page = write_report(run, previous=only_sel).read_text(encoding="utf-8")
    assert "manifest.json not found" in page and "entered the selection" in page

    broken = tmp_path / "v0003"
    broken.mkdir()
    (broken / "selection.parquet").write_bytes(b"not parquet")
    (broken / "manifest.json").write_text("{not json")
    page = write_report(run, previous=broken).read_text(encoding="utf-8")
    assert "could not be read" in page and "Changes since v0003" in page

    page = write_report(run, previous=tmp_path / "nope").read_text(encoding="utf-8")
    assert "does not exist" in page

    # a previous manifest with per-domain counts is used for the shares before (gone rows included)
    man_prev = make_previous(run, tmp_path / "v0004", drop=0, flip_every=None, gone_kept=0)
    sel = pl.read_parquet(man_prev / "selection.parquet").join(
        pl.read_parquet(run / "scores" / "rows.parquet"), on="id", how="left"
    )
    m = json.loads((man_prev / "manifest.json").read_text())
    m["domains"] = {
        d: {"input_rows": n, "kept_rows": k, "weight_sum": float(k), "proportion": 0.0}
        for d, n, k in sel.group_by("domain").agg(n=pl.len(), k=pl.col("kept").sum()).iter_rows()
        if d is not None
    }
    (man_prev / "manifest.json").write_text(json.dumps(m))
    page = write_report(run, previous=man_prev).read_text(encoding="utf-8")
    assert "counted from v0004/manifest.json" in page
    assert "<b>0</b><span>entered the selection" in page and "<b>0</b><span>left the selection" in page


# --------------------------------------------------------------------------------------------------
# plots: every figure says what it shows


def _figure_problems(fig) -> list[str]:
    """What a rendered figure lacks: a title per Axes with content (or a suptitle), x and y labels, tick
    labels on image axes (heatmaps), a label on colorbars."""
    suptitle = (
        fig.get_suptitle()
        if hasattr(fig, "get_suptitle")
        else (fig._suptitle.get_text() if fig._suptitle else "")
    )
    problems = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        if ax.get_label() == "<colorbar>":
            if not (ax.get_ylabel().strip() or ax.get_xlabel().strip()):
                problems.append(f"axes {i}: colorbar without a label")
            continue
        if not (ax.lines or ax.patches or ax.collections or ax.images or ax.texts or ax.containers):
            continue
        name = ax.get_title() or ax.get_title("left") or ax.get_title("right") or suptitle
        if not name.strip():
            problems.append(f"axes {i}: no title")
        for axis, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
            if not label.strip():
                problems.append(f"axes {i} ({name!r}): no {axis} label")
        if ax.images:
            for axis, ticks in (("x", ax.get_xticklabels()), ("y", ax.get_yticklabels())):
                if not any(t.get_text().strip() for t in ticks):
                    problems.append(f"axes {i} ({name!r}): image without {axis} tick labels")
    return problems


def test_figure_check_can_fail() -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([0, 1], [1, 0])
    ax1.set_title("t")
    ax1.set_xlabel("x")
    ax2.imshow([[0.0, 1.0], [1.0, 0.0]])
    ax2.set_xticks([])
    fig.colorbar(ax2.images[0], ax=ax2)
    fig.savefig(io.BytesIO(), format="png")
    problems = _figure_problems(fig)
    assert any("axes 0" in p and "no y label" in p for p in problems)
    assert any("axes 1: no title" in p for p in problems)
    assert any("image without x tick labels" in p for p in problems)
    assert any("colorbar without a label" in p for p in problems)


def test_every_plot_has_title_and_axis_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from winnow.pipeline import report

    run = make_run(tmp_path)
    # an influence and a mixture section, so that their plots are drawn too
    pl.DataFrame(
        {
            "target_id": ["t0"] * 3 + ["t1"] * 3,
            "target_preview": ["target text"] * 6,
            "subtask": ["a"] * 3 + ["b"] * 3,
            "rank": [1, 2, 3] * 2,
            "id": [f"row-{i:04d}" for i in range(6)],
            "domain": ["web", "code", "books"] * 2,
            "influence": [0.9, 0.5, 0.1] * 2,
            "preview": ["neighbour text"] * 6,
        }
    ).write_parquet((run / "influence").mkdir() or run / "influence" / "neighbours.parquet")
    steps = list(range(0, 50, 10))
    pl.DataFrame(
        {
            "step": steps,
            "web": [0.5, 0.45, 0.4, 0.4, 0.38],
            "code": [0.3, 0.35, 0.4, 0.4, 0.42],
            "books": [0.2] * 5,
            "entropy": [1.03, 1.04, 1.05, 1.05, 1.05],
        }
    ).write_parquet(run / "mixture_trajectory.parquet")
    (run / "mixture.json").write_text(
        json.dumps(
            {
                "method": "doremi",
                "output": "average",
                "steps": 50,
                "weights": {"web": 0.4, "code": 0.4, "books": 0.2},
            }
        )
    )
    prev = make_previous(run, tmp_path / "v0001")

    seen: dict[str, list[str]] = {}
    render = report._png

    def checked(fig) -> bytes:
        png = render(fig)  # drawn first, so tick labels are filled in
        seen.setdefault(sys._getframe(1).f_code.co_name, []).extend(_figure_problems(fig))
        return png

    monkeypatch.setattr(report, "_png", checked)
    write_report(run, previous=prev)
    plots = {name for name in vars(report) if name.startswith("_plot_")}
    assert set(seen) == plots, f"plots not drawn by this test: {plots - set(seen)}"
    assert {k: v for k, v in seen.items() if v} == {}

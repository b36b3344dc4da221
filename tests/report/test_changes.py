"""The section "Changes since <previous version>": write_report(out=, previous=)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl

from tests.report.conftest import _check_page, make_previous, make_run
from winnow.report import write_report


def test_previous_version_changes(tmp_path: Path) -> None:
    run = make_run(tmp_path, keep_fraction=0.5)
    prev = make_previous(run, tmp_path / "runs" / "demo" / "v0001")
    out = write_report(run, fingerprint="fp-1", out=tmp_path / "v0002" / "report.html", previous=prev)
    assert out == tmp_path / "v0002" / "report.html" and out.is_file()
    assert not (run / "report.html").exists()  # out= replaces the default place
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temporary left
    page = out.read_text(encoding="utf-8")
    _check_page(page)
    from winnow.report import report_fingerprint

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

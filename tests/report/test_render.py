"""report.html: self-contained, escaped, every section present; edge cases render."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.conftest import SCRIPT, _check_page, make_run
from winnow.report import summarize, write_report


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

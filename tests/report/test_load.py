"""winnow.report.load: what is required of a run folder, and what may be missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.conftest import make_run
from winnow.report import summarize, write_report


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

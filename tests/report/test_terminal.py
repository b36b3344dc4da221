"""winnow.report.terminal: print_summary, the output of `winnow inspect`."""

from __future__ import annotations

import io
from pathlib import Path

from tests.report.conftest import make_run
from winnow.report import print_summary


def test_print_summary(tmp_path: Path) -> None:
    from rich.console import Console

    run = make_run(tmp_path, nan_rows=2)
    buf = io.StringIO()
    s = print_summary(run, console=Console(file=buf, width=160))
    text = buf.getvalue()
    assert "demo" in text and f"{s['counts']['kept_rows']:,}" in text
    for word in ("web", "code", "books", "pos", "neg", "el2n", "Spearman"):
        assert word in text

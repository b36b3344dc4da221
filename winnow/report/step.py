"""The report step (``report``): ``RUN/report.html`` for the outputs of one emit.

The page compares with the version these outputs follow (the "Changes since" section): the latest
version when the outputs differ from its (the version step then freezes them as the next one), else the
version before it. So the run's report is the report of the version it makes, and the version step copies
it instead of rendering a second page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import winnow
from winnow.pipeline.atomic import fingerprint
from winnow.pipeline.steps import RunContext, Step, register_step


def previous_version(run_dir: Path, emit_fp: str) -> Path | None:
    """The version folder that outputs of emit fingerprint ``emit_fp`` are compared with, or None."""
    from winnow.pipeline.versions import list_versions

    versions = list_versions(run_dir)
    if not versions:
        return None
    latest = versions[-1]
    if latest.get("emit_fingerprint") != emit_fp:
        return Path(latest["path"])  # these outputs become the next version
    before = [v for v in versions if v["name"] == latest.get("previous")]
    return Path(before[0]["path"]) if before else None  # they are the latest version


@register_step
class ReportStep(Step):
    name = "report"

    def fingerprint(self, ctx: RunContext, emit_fp: str = "") -> str:
        prev = previous_version(ctx.root, emit_fp)
        return fingerprint("report", emit_fp, prev.name if prev else None, winnow.__version__)

    def run(self, ctx: RunContext, fp: str, emit_fp: str = "", **_: Any) -> str:
        from winnow.report import write_report

        prev = previous_version(ctx.root, emit_fp)
        return ctx.layout.rel(write_report(ctx.root, fingerprint=fp, previous=prev))

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        from winnow.report import report_fingerprint

        return report_fingerprint(ctx.layout.path(result)) == fp

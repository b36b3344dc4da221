"""The report step (``report``): ``RUN/report.html`` for the outputs of one emit."""

from __future__ import annotations

from typing import Any

import winnow
from winnow.pipeline.atomic import fingerprint
from winnow.pipeline.steps import RunContext, Step, register_step


@register_step
class ReportStep(Step):
    name = "report"

    def fingerprint(self, ctx: RunContext, emit_fp: str = "") -> str:
        return fingerprint("report", emit_fp, winnow.__version__)

    def run(self, ctx: RunContext, fp: str, **_: Any) -> str:
        from winnow.report import write_report

        return ctx.layout.rel(write_report(ctx.root, fingerprint=fp))

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        from winnow.report import report_fingerprint

        return report_fingerprint(ctx.layout.path(result)) == fp

"""Versioned outputs: every run that changes the selection writes ``RUN/v0001/``, ``RUN/v0002/``, ...

A version folder holds what a consumer needs from that run, frozen: ``manifest.json``,
``selection.parquet``, ``shards/`` (hard links to the emitted files where the file system allows, else
copies), ``report.html`` (the report of that run, with what changed since the previous version), and
``version.json``:

    {"version": 3, "name": "v0003", "created_at": "...Z", "rows": ..., "kept": ..., "pruned": ...,
     "scored_rows": rows scored by this run (the rest came from the score cache), "reused_rows": ...,
     "new_rows": rows not in the previous version, "removed_rows": rows gone since it,
     "entered": rows kept now and not before (new rows included), "left": rows kept before and not now,
     "previous": "v0002", "input_fingerprint": ..., "emit_fingerprint": ..., "flow_run_id": ...,
     "cache_fingerprint": the score cache's (scores/cache/<fp16>/ is kept while a version names it)}

A run whose emitted outputs are those of the latest version (same emit fingerprint) adds no version.
Versions are never rewritten; each appears atomically (written under a temporary name, then renamed).
The top-level files of the run folder are always the latest run's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl

from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, write_json
from winnow.pipeline.layout import VERSION_FILE, VERSIONED_FILES, RunLayout, version_name
from winnow.pipeline.steps import RunContext, Step, register_step


def list_versions(run_dir: str | Path) -> list[dict[str, Any]]:
    """The versions of a run folder, oldest first (each its version.json, plus ``path``)."""
    run_dir = Path(run_dir)
    out = []
    if not run_dir.is_dir():
        return out
    for _, d in RunLayout(run_dir).versions():
        try:
            info = json.loads((d / VERSION_FILE).read_text())
        except ValueError:
            raise WinnowError(f"{d / VERSION_FILE}: not valid JSON") from None
        out.append(dict(info, path=str(d)))
    return sorted(out, key=lambda v: v["version"])


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def _changes(sel: pl.DataFrame, prev_dir: Path | None) -> dict[str, int]:
    """New, removed, entered and left rows against the previous version's selection (joins on id, not
    sets of Python strings: a million rows cost tens of megabytes, not hundreds)."""
    now = sel.select(pl.col("id"), pl.col("kept").fill_null(False))
    prev_sel = RunLayout(prev_dir).selection if prev_dir is not None else None
    if prev_sel is None or not prev_sel.exists():
        return {"new_rows": now.height, "removed_rows": 0, "entered": int(now["kept"].sum()), "left": 0}
    prev = pl.read_parquet(prev_sel, columns=["id", "kept"]).with_columns(pl.col("kept").fill_null(False))
    kept_now, kept_before = now.filter(pl.col("kept")), prev.filter(pl.col("kept"))
    return {
        "new_rows": now.join(prev, on="id", how="anti").height,
        "removed_rows": prev.join(now, on="id", how="anti").height,
        "entered": kept_now.join(kept_before, on="id", how="anti").height,
        "left": kept_before.join(kept_now, on="id", how="anti").height,
    }


def write_version(
    run_dir: str | Path,
    emit_fingerprint: str,
    input_fingerprint: str,
    scored: int,
    reused: int,
    report_fingerprint: str | None = None,
    flow_run_id: str | None = None,
    cache_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Freeze the run folder's current outputs as the next version (unless they are the latest one's)."""
    from winnow.report import write_report

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    versions = list_versions(run_dir)
    latest = versions[-1] if versions else None
    if latest is not None and latest.get("emit_fingerprint") == emit_fingerprint:
        return dict(latest, new=False)
    n = (latest["version"] if latest else 0) + 1
    name = version_name(n)
    prev_dir = Path(latest["path"]) if latest else None
    sel = pl.read_parquet(layout.selection, columns=["id", "kept"])
    man = json.loads(layout.manifest.read_text())
    info: dict[str, Any] = {
        "version": n,
        "name": name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": man["counts"]["input_rows"],
        "kept": man["counts"]["kept_rows"],
        "pruned": man["counts"]["pruned_rows"],
        "scored_rows": scored,
        "reused_rows": reused,
        **_changes(sel, prev_dir),
        "previous": latest["name"] if latest else None,
        "input_fingerprint": input_fingerprint,
        "emit_fingerprint": emit_fingerprint,
        "flow_run_id": flow_run_id,
        "cache_fingerprint": cache_fingerprint,
    }
    with atomic_path(layout.version(n)) as tmp:
        tmp.mkdir(parents=True)
        frozen = RunLayout(tmp)
        for f in VERSIONED_FILES:
            if (run_dir / f).exists():
                shutil.copy2(run_dir / f, tmp / f)
        if layout.shards.is_dir():
            _link_tree(layout.shards, frozen.shards)
        if _report_is(layout.report, report_fingerprint):
            # the report step's page already compares with this version's previous one (report/step.py)
            shutil.copy2(layout.report, frozen.report)
        else:
            write_report(run_dir, fingerprint=report_fingerprint, out=frozen.report, previous=prev_dir)
        write_json(tmp / VERSION_FILE, info)
    return dict(info, path=str(layout.version(n)), new=True)


def _report_is(path: Path, fp: str | None) -> bool:
    """Whether ``path`` is the report rendered for these outputs (its recorded fingerprint is ``fp``)."""
    from winnow.report import report_fingerprint

    return fp is not None and path.exists() and report_fingerprint(path) == fp


@register_step
class VersionStep(Step):
    """A new version ``RUN/v000N/`` when the outputs changed (``version``); never cached: it compares
    with the versions on disk. ``flow_run_id``: the scheduled (root) flow run's id, which it records."""

    name = "version"
    cached = False

    def fingerprint(self, ctx: RunContext, **_: Any) -> str:
        return "version"

    def run(
        self,
        ctx: RunContext,
        fp: str,
        emit_fp: str = "",
        input_fp: str = "",
        scored: int = 0,
        reused: int = 0,
        report_fp: str | None = None,
        flow_run_id: str | None = None,
        cache_fp: str | None = None,
    ) -> dict[str, Any]:
        return write_version(
            ctx.root,
            emit_fp,
            input_fp,
            scored,
            reused,
            report_fingerprint=report_fp,
            flow_run_id=flow_run_id,
            cache_fingerprint=cache_fp,
        )


__all__ = ["VersionStep", "list_versions", "write_version"]

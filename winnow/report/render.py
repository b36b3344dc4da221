"""The page: the header (run facts, counts, warnings), every section of ``SECTIONS`` that applies, and
a table of contents."""

from __future__ import annotations

from datetime import datetime, timezone

from winnow.report.html import _CSS, _e, _note, _Raw, _section, _table
from winnow.report.load import _Previous, _Run
from winnow.report.sections import SECTIONS, Context
from winnow.report.text import _cut_text, _pct, _rows


def _overview(s: dict) -> str:
    """The header below the title: run facts, the counts as cards, and the warnings."""
    info, counts = s["run"], s["counts"]
    col = s["selection_score"]
    cutoff = s["cutoff"]
    cut_text = _cut_text(cutoff, s["cutoff_side"])
    facts = [
        ["run", info["name"]],
        ["run directory", info["dir"]],
        ["winnow version (run)", info["winnow_version"] or "not recorded"],
        ["created", info["created"]],
        ["selector", info["selector"]],
        ["selection score (plotted)", col or "–"],
        ["cut-off", cut_text],
        [
            "report generated",
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} by winnow {info['report_version']}",
        ],
    ]
    body = [_table(None, [[_Raw(f"<b>{_e(k)}</b>"), v] for k, v in facts], "kv")]
    n = counts["input_rows"]
    body.append(
        '<div class="cards">'
        f'<div class="card"><b>{n:,}</b><span>input rows</span></div>'
        f'<div class="card kept"><b>{counts["kept_rows"]:,}</b><span>kept '
        f"({_pct(counts['kept_fraction'])})</span></div>"
        f'<div class="card pruned"><b>{counts["pruned_rows"]:,}</b><span>pruned '
        f"({_pct(None if not n else counts['pruned_rows'] / n)})</span></div></div>"
    )
    mc = s["manifest_counts"]
    if mc:
        mism = [
            (k, mc.get(k), counts[k])
            for k in ("input_rows", "kept_rows", "pruned_rows")
            if mc.get(k) is not None and mc.get(k) != counts[k]
        ]
        for k, a, b in mism:
            body.append(
                _note(
                    f"manifest.json records {k} = {a:,} but selection.parquet has {b:,}: "
                    "the manifest may come from an earlier selection.",
                    "warn",
                )
            )
    if not info["has_manifest"]:
        body.append(
            _note(
                "No manifest.json yet (the run has not emitted shards): this report is built from "
                "the scores and the selection alone."
            )
        )
    bad = s["selection_score_not_finite"]
    if bad and bad["rows"]:
        verb = "has" if bad["rows"] == 1 else "have"
        body.append(
            _note(
                f"{_rows(bad['rows'])} {verb} a NaN, infinite or missing {col} "
                f"({bad['kept']:,} kept, {bad['pruned']:,} pruned); plots leave them out.",
                "warn",
            )
        )
    for msg in s["signal"]:
        body.append(_note("Signal check: " + msg, "warn"))
    for msg in s["notes"]:
        body.append(_note(msg, "warn"))
    return "".join(body)


def _render(run: _Run, s: dict, prev: _Previous | None = None) -> str:
    ctx = Context(run, s, prev)
    toc: list[tuple[str, str]] = []
    parts = []
    for sec in SECTIONS:
        body = sec(ctx)
        if body is not None:
            parts.append(_section(sec.anchor, sec.title_for(ctx), body, toc))
    nav = (
        "<nav><b>Contents</b><ol>"
        + "".join(f'<li><a href="#{_e(a)}">{_e(t)}</a></li>' for a, t in toc)
        + "</ol></nav>"
    )
    title = f"winnow report: {s['run']['name']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body><main>"
        f"<header><h1>{_e(title)}</h1>{_overview(s)}</header>{nav}{''.join(parts)}"
        "</main></body></html>\n"
    )

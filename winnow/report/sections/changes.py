"""Section "Changes since <previous version>": what entered and left the selection, and why.

Shown when the report is written with ``previous=FOLDER``: rows that entered and left the selection,
new and gone rows, kept shares per domain and label before and after (from ``stats._changes``), and
examples of both.
"""

from __future__ import annotations

import math

import polars as pl

from winnow.report.html import _e, _img, _note, _Raw, _table
from winnow.report.load import _previews
from winnow.report.plots import _plot_change_shares
from winnow.report.sections.base import Context, section
from winnow.report.stats import GONE_GROUP, _changes, _selector_summary
from winnow.report.text import _pct, _rows

N_CHANGE_EXAMPLES = 5  # entered / left rows shown


@section("changes", lambda ctx: f"Changes since {ctx.previous.name}")
def changes_since(ctx: Context) -> str | None:
    if ctx.previous is None:
        return None
    run, prev, s = ctx.run, ctx.previous, ctx.summary
    ch = _changes(run, prev, s)
    body = [
        _note(
            f"Compared with the previous version in {prev.dir}. Entered: rows kept now that were pruned "
            "before or are new; left: rows kept before that are pruned now or gone from the data. New rows: "
            "ids of this run that the previous selection does not have; gone rows: the reverse."
        )
    ]
    body.extend(_note(msg, "warn") for msg in prev.notes)
    man = prev.manifest
    if man is not None:
        cur = run.manifest or {}
        pc = man.get("counts") if isinstance(man.get("counts"), dict) else {}
        facts = [
            ["created", man.get("created"), s["run"]["created"]],
            ["winnow version", man.get("winnow_version"), s["run"]["winnow_version"]],
            ["selector", _selector_summary(man.get("selector")), s["run"]["selector"]],
            ["recipe fingerprint", man.get("recipe_fingerprint"), cur.get("recipe_fingerprint")],
            ["input rows", pc.get("input_rows"), s["counts"]["input_rows"]],
            ["kept rows", pc.get("kept_rows"), s["counts"]["kept_rows"]],
        ]
        body.append(
            _table(["", prev.name, "this run"], [[_Raw(f"<b>{_e(k)}</b>"), a, b] for k, a, b in facts])
        )
    if ch is None:
        return "".join(body)
    c = ch["counts"]
    body.append(
        '<div class="cards">'
        f'<div class="card kept"><b>{c["entered"]:,}</b><span>entered the selection<br>'
        f"({c['entered_pruned_before']:,} pruned before, {c['entered_new']:,} new rows)</span></div>"
        f'<div class="card pruned"><b>{c["left"]:,}</b><span>left the selection<br>'
        f"({c['left_pruned_now']:,} pruned now, {c['left_gone']:,} gone)</span></div>"
        f'<div class="card"><b>{c["new_rows"]:,}</b><span>new rows<br>({c["entered_new"]:,} kept)</span></div>'
        f'<div class="card"><b>{c["gone_rows"]:,}</b><span>gone rows<br>({c["left_gone"]:,} were kept)</span></div>'
        f'<div class="card"><b>{c["kept_both"]:,}</b><span>kept in both</span></div></div>'
    )
    body.append(
        _table(
            ["", prev.name, "this run"],
            [
                ["rows", c["rows_before"], c["rows_now"]],
                ["kept rows", c["kept_before"], c["kept_now"]],
            ],
        )
    )
    body.append(
        _table(
            ["change", "rows"],
            [
                ["entered: pruned before, kept now", c["entered_pruned_before"]],
                ["entered: new rows, kept now", c["entered_new"]],
                ["left: kept before, pruned now", c["left_pruned_now"]],
                ["left: kept before, gone from the data", c["left_gone"]],
                ["new rows (kept or pruned)", c["new_rows"]],
                ["gone rows (kept or pruned before)", c["gone_rows"]],
                ["kept in both", c["kept_both"]],
            ],
        )
    )
    body.extend(_note(msg, "warn") for msg in ch["notes"])
    for group, g in ch["groups"].items():
        body.append(f"<h3>Kept rows per {group}, before and after</h3>")
        if not g["rows"]:
            body.append(_note(f"No kept rows before or now: no {group} shares to compare."))
            continue
        src = (
            f"the kept rows before are counted from {prev.name}/manifest.json (rows gone from the data "
            "included)"
            if g["source"] == "manifest"
            else f"the kept rows before are counted from {prev.name}/selection.parquet with this run's {group}s; "
            f"rows gone from the data are shown as {GONE_GROUP}"
        )
        body.append(
            _note(
                f"Share: the {group}'s part of all kept rows; {src}. Entered and left count rows "
                "still in the data (rows gone from the data are in the totals above)."
            )
        )
        body.append(
            _img(
                _plot_change_shares(group, g["rows"], prev.name),
                f"share of kept rows per {group}, {prev.name} vs this run",
            )
        )
        rows = []
        for n, r in g["rows"].items():
            delta = (
                None
                if r["share_before"] is None or r["share_now"] is None
                else f"{100 * (r['share_now'] - r['share_before']):+.1f}"
            )
            rows.append(
                [
                    n,
                    r["kept_before"],
                    _pct(r["share_before"]),
                    r["kept_now"],
                    _pct(r["share_now"]),
                    delta,
                    r["entered"],
                    r["entered_new"],
                    r["left"],
                ]
            )
        body.append(
            _table(
                [
                    group,
                    "kept before",
                    "share before",
                    "kept now",
                    "share now",
                    "change (points)",
                    "entered",
                    "of which new rows",
                    "left (pruned now)",
                ],
                rows,
            )
        )
    col = s["selection_score"]
    j = ch["frame"]
    picks = []
    for flag, what in (("_entered", "entered"), ("_left", "left")):
        part = j.filter(pl.col(flag))
        n_part = part.height
        if col is not None:
            # entered: the highest scores first; left: the lowest first; NaN and null last
            part = part.with_columns(_s=pl.when(pl.col(col).is_finite()).then(pl.col(col)))
            part = part.sort(["_s", "id"], descending=[flag == "_entered", False], nulls_last=True)
            how = f"the {'highest' if flag == '_entered' else 'lowest'} {col} first"
        else:
            part = part.sort("id")
            how = "first ids"
        picks.append((what, n_part, how, part.head(N_CHANGE_EXAMPLES)))
    previews = _previews(run, [i for *_, p in picks for i in p["id"].to_list()])
    for what, n_part, how, part in picks:
        extra = " and still in the data" if what == "left" else ""
        body.append(
            f"<h3>{_e(f'Rows that {what} the selection{extra} ({n_part:,}; {part.height:,} shown, {how})')}"
            "</h3>"
        )
        if part.height == 0:
            body.append(_note("none"))
            continue
        rows = []
        for r in part.iter_rows(named=True):
            status = ("new row" if r["_new"] else "pruned before") if what == "entered" else "pruned now"
            score = (
                "–"
                if col is None
                else (r[col] if r[col] is None or not math.isfinite(r[col]) else f"{r[col]:.6g}")
            )
            rows.append(
                [
                    r["id"],
                    status,
                    r["domain"],
                    r["label"],
                    score,
                    r["weight_before"],
                    r["weight"],
                    r["n_tokens"],
                    _Raw(f'<div class="preview">{_e(previews.get(r["id"], ""))}</div>'),
                ]
            )
        body.append(
            _table(
                [
                    "id",
                    "status",
                    "domain",
                    "label",
                    col or "score",
                    "weight before",
                    "weight now",
                    "tokens",
                    "preview",
                ],
                rows,
            )
        )
    if c["left_gone"]:
        gone_ids = (
            prev.selection.filter(pl.col("kept_before"))
            .join(run.frame.select("id"), on="id", how="anti")["id"]
            .head(N_CHANGE_EXAMPLES)
            .to_list()
        )
        body.append(
            _note(
                f"{_rows(c['left_gone'])} that were kept left because they are gone from the data "
                f"(no text or scores in this run); the first: {', '.join(gone_ids)}"
            )
        )
    return "".join(body)

"""Section "Kept and pruned per domain and label", with the weights of the kept rows."""

from __future__ import annotations

from winnow.report.html import _e, _img, _note, _table
from winnow.report.plots import _plot_group_counts, _plot_weights
from winnow.report.sections.base import Context, section
from winnow.report.stats import MAX_GROUPS
from winnow.report.text import _fmt, _pct


@section("groups", "Kept and pruned per domain and label")
def kept_and_pruned(ctx: Context) -> str:
    run, s = ctx.run, ctx.summary
    frame = run.frame
    body = []
    for group, label in (("domain", "domains"), ("label", "labels")):
        stats = s[label]
        body.append(f"<h3>Per {group}</h3>")
        if not stats:
            body.append(_note(f"The data has no {group} column (all null)."))
            continue
        body.append(_img(_plot_group_counts(group, stats), f"kept and pruned rows per {group}"))
        body.append(_group_table(stats, group))
    body.append("<h3>Weights of kept rows</h3>")
    w = s["weights"]
    body.append(_img(_plot_weights(frame), "histogram of the weights of kept rows"))
    body.append(
        _table(
            ["kept rows", "min", "mean", "max", "std", "sum"],
            [[w["kept_rows"], w["min"], w["mean"], w["max"], w["std"], w["sum"]]],
        )
    )
    if w["min"] is not None and w["min"] == w["max"]:
        body.append(
            _note(f"Every kept row has weight {_fmt(w['min'])}: the selector prunes without reweighting.")
        )
    return "".join(body)


def _group_table(stats: dict[str, dict], name: str) -> str:
    if len(stats) <= MAX_GROUPS:
        return _group_rows(stats, name)
    top = dict(list(stats.items())[:MAX_GROUPS])
    return (
        _group_rows(top, name)
        + f"<details><summary>all {len(stats):,} values of {_e(name)}</summary>"
        + _group_rows(stats, name)
        + "</details>"
    )


def _group_rows(stats: dict[str, dict], name: str) -> str:
    has_man = any("manifest_proportion" in s for s in stats.values())
    headers = [
        name,
        "input rows",
        "kept",
        "pruned",
        "kept %",
        "share before",
        "share after (rows)",
        "weight sum",
        "share after (weight)",
    ] + (["manifest proportion"] if has_man else [])
    rows = []
    for g, s in stats.items():
        row = [
            g,
            s["input_rows"],
            s["kept_rows"],
            s["pruned_rows"],
            _pct(s["kept_fraction"]),
            _pct(s["proportion_before"]),
            _pct(s["proportion_after"]),
            s["weight_sum"],
            _pct(s["weight_proportion"]),
        ]
        if has_man:
            row.append(_pct(s.get("manifest_proportion")))
        rows.append(row)
    return _table(headers, rows)

"""Section "Score distributions": the mean score columns of kept and pruned rows, per domain and label."""

from __future__ import annotations

from winnow.report.html import _e, _img, _note, _table
from winnow.report.plots import _plot_group_boxes, _plot_score_hists
from winnow.report.sections.base import Context, section


@section("scores", "Score distributions")
def score_distributions(ctx: Context) -> str:
    run, s = ctx.run, ctx.summary
    frame, col, cutoff = run.frame, s["selection_score"], s["cutoff"]
    body = []
    if col is None:
        body.append(_note("No score columns found in scores/."))
    else:
        means = [col] + [c for c in run.means if c != col]
        body.append(
            _img(
                _plot_score_hists(frame, means, col, cutoff),
                f"histograms of {', '.join(means[:6])} for kept and pruned rows",
            )
        )
        for group, label in (("domain", "domains"), ("label", "labels")):
            stats = s[label]
            body.append(f"<h3>{_e(col)} per {group}</h3>")
            if not stats:
                body.append(_note(f"The data has no {group} column (all null): nothing to split by."))
            else:
                body.append(
                    _img(
                        _plot_group_boxes(frame, group, stats, col, cutoff),
                        f"box plots of {col} per {group}, kept vs pruned",
                    )
                )
        body.append("<h3>Statistics per score column</h3>")
        body.append(
            _note("NaN, inf and null are counted apart; every other statistic is over finite values.")
        )
        rows = []
        for c, st in s["scores"].items():
            ckpt = "mean" if st["seed"] is None else f"seed {st['seed']}, step {st['step']}"
            rows.append(
                [
                    c,
                    st["file"],
                    ckpt,
                    st["finite"],
                    st["nan"],
                    st["inf"],
                    st["null"],
                    st["mean"],
                    st["std"],
                    st["min"],
                    st["median"],
                    st["max"],
                    st["kept_mean"],
                    st["pruned_mean"],
                ]
            )
        body.append(
            _table(
                [
                    "column",
                    "file",
                    "checkpoint",
                    "finite",
                    "NaN",
                    "inf",
                    "null",
                    "mean",
                    "std",
                    "min",
                    "median",
                    "max",
                    "kept mean",
                    "pruned mean",
                ],
                rows,
            )
        )
    return "".join(body)

"""Section "Checkpoint agreement": Spearman correlation between the checkpoint columns of each score."""

from __future__ import annotations

from winnow.report.html import _e, _img, _note, _table
from winnow.report.plots import _plot_heatmap
from winnow.report.sections.base import Context, section
from winnow.report.text import _rows


@section("agreement", "Checkpoint agreement")
def checkpoint_agreement(ctx: Context) -> str:
    s = ctx.summary
    body = [
        _note(
            "Spearman rank correlation between score columns, over rows where every column is finite. "
            "Close to 1: seeds and steps rank the data alike, so the selection does not hinge on one "
            "proxy run. Well below 1: the ranking is noisy; more seeds or later checkpoints help."
        )
    ]
    if not s["agreement"]:
        body.append(_note("Fewer than two checkpoint columns per score: nothing to compare."))
    for name, a in s["agreement"].items():
        body.append(f"<h3>{_e(name)}</h3>")
        if a["matrix"] is None:
            body.append(
                _note(f"Only {_rows(a['rows'])} with finite scores in every column: needs at least 3.")
            )
            continue
        p = a["pairs"]
        sampled = f" (a random sample of {a['rows']:,} of {a['complete_rows']:,})" if a["sampled"] else ""
        body.append(
            _table(
                [
                    "rows used",
                    "mean ρ, all pairs",
                    "mean ρ, seeds at the same step",
                    "mean ρ, steps of the same seed",
                ],
                [
                    [
                        f"{a['rows']:,}{sampled}",
                        p["all_pairs"],
                        p["between_seeds_same_step"],
                        p["between_steps_same_seed"],
                    ]
                ],
            )
        )
        body.append(_img(_plot_heatmap(name, a), f"Spearman correlation heatmap for {name}"))
        short = [c.split("@", 1)[1] if "@" in c else c for c in a["columns"]]
        body.append(
            "<details><summary>values</summary>"
            + _table([""] + short, [[short[i]] + row for i, row in enumerate(a["matrix"])])
            + "</details>"
        )
    return "".join(body)

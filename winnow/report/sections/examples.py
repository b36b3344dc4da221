"""Section "Examples": the highest- and lowest-scoring kept and pruned rows, with their text."""

from __future__ import annotations

import math

import polars as pl

from winnow.report.html import _e, _note, _Raw, _table
from winnow.report.load import _previews
from winnow.report.sections.base import Context, section

N_EXAMPLES = 10


@section("examples", "Examples")
def examples(ctx: Context) -> str:
    run, col = ctx.run, ctx.summary["selection_score"]
    frame = run.frame
    if col is None:
        return _note("No score column, so no examples to rank.")
    fin = frame.filter(pl.col(col).is_finite())
    picks: list[tuple[str, pl.DataFrame]] = []
    for kept, label in ((True, "kept"), (False, "pruned")):
        part = fin.filter(pl.col("kept") == kept)
        picks.append(
            (
                f"Highest-scoring {label} rows",
                part.top_k(N_EXAMPLES, by=col).sort([col, "id"], descending=[True, False]),
            )
        )
        picks.append((f"Lowest-scoring {label} rows", part.bottom_k(N_EXAMPLES, by=col).sort([col, "id"])))
    bad = frame.filter(~pl.col(col).is_finite() | pl.col(col).is_null())
    if bad.height:
        picks.append(
            (
                f"Rows whose {col} is NaN, infinite or missing ({bad.height:,}; first {N_EXAMPLES})",
                bad.head(N_EXAMPLES),
            )
        )
    previews = _previews(run, [i for _, p in picks for i in p["id"].to_list()])
    out = []
    for title, part in picks:
        out.append(f"<h3>{_e(title)}</h3>")
        if part.height == 0:
            out.append(_note("none"))
            continue
        rows = []
        for r in part.iter_rows(named=True):
            preview = previews.get(r["id"], "")
            score = r[col] if r[col] is None or not math.isfinite(r[col]) else f"{r[col]:.6g}"
            rows.append(
                [
                    r["id"],
                    r["domain"],
                    r["label"],
                    score,
                    r["weight"],
                    r["n_tokens"],
                    _Raw(f'<div class="preview">{_e(preview)}</div>'),
                ]
            )
        out.append(_table(["id", "domain", "label", col, "weight", "tokens", "preview"], rows))
    return "".join(out)

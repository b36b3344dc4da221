"""``select.method: score``: keep rows by one score column: the highest, the lowest, or Data Diet's band
(Paul et al. 2021, Sec. 4: skip the ``offset`` hardest, keep the next), by fraction, count or threshold,
optionally within each stratum (:func:`winnow.selectors.select`)."""

from __future__ import annotations

from winnow.pipeline.selection.registry import SelectContext, Selector, register_selector


def _run(ctx: SelectContext):
    import numpy as np
    import polars as pl

    from winnow.selectors import select

    sel = ctx.recipe.select
    s = ctx.frame[sel.score].cast(pl.Float64).fill_null(np.nan).to_numpy()
    kept = select(
        s,
        fraction=sel.fraction,
        count=sel.count,
        threshold=sel.threshold,
        keep=sel.keep,
        offset=sel.offset,
        strata=ctx.strata,
    )
    return kept, None


register_selector(
    Selector(
        name="score",
        run=_run,
        scores=lambda sel: [("select.score", sel.score)],
        doc="keep by one score: highest, lowest or a band",
    )
)

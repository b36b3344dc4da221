"""``select.method: random``: the seeded random baseline, by fraction or count, optionally within each
stratum (:func:`winnow.selectors.random_select`)."""

from __future__ import annotations

from winnow.pipeline.selection.registry import SelectContext, Selector, register_selector


def _run(ctx: SelectContext):
    from winnow.selectors import random_select

    sel = ctx.recipe.select
    return random_select(
        ctx.n, fraction=sel.fraction, count=sel.count, seed=sel.seed, strata=ctx.strata
    ), None


register_selector(Selector(name="random", run=_run, budgets=("fraction", "count"), doc="seeded random rows"))

"""``select.method: all``: keep every row (a mixture or a weight method sets the weights)."""

from __future__ import annotations

from winnow.pipeline.selection.registry import SelectContext, Selector, register_selector


def _run(ctx: SelectContext):
    import numpy as np

    return np.ones(ctx.n, dtype=bool), None


register_selector(Selector(name="all", run=_run, budgets=(), doc="every row"))

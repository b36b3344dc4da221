"""The selection step (recipe section ``select``): selectors and weight methods, each registered by the
file that implements it (:mod:`.registry`).

- selectors (``select.method``): :mod:`.by_score` (``score``), :mod:`.by_random` (``random``),
  :mod:`.keep_all` (``all``), :mod:`.dpp` (``dpp``, with its options section ``select.dpp``)
- weight methods (``select.weights.method``): :mod:`.weights`
- :mod:`.table`: the step itself, score store → ``selection.parquet`` (imported on its own: it needs polars)

A new selector is one new file here plus its import below (and its test).
"""

# The registration order is the order in which the recipe and its errors list the choices.
# isort: off
import winnow.pipeline.selection.by_score  # noqa: F401
import winnow.pipeline.selection.by_random  # noqa: F401
import winnow.pipeline.selection.keep_all  # noqa: F401
import winnow.pipeline.selection.dpp  # noqa: F401
import winnow.pipeline.selection.weights  # noqa: F401

# isort: on
from winnow.pipeline.selection.registry import (
    SELECTORS,
    WEIGHTS,
    SelectContext,
    Selector,
    WeightMethod,
    register_selector,
    register_weights,
)

__all__ = [
    "SELECTORS",
    "WEIGHTS",
    "SelectContext",
    "Selector",
    "WeightMethod",
    "register_selector",
    "register_weights",
]

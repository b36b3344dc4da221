"""The registries of the selection step: selectors (``select.method``) and weight methods
(``select.weights.method``).

A selector turns the score store (and whatever else the run holds: embeddings, ...) into a ``kept`` mask;
a weight method turns a score column into training weights over the kept rows. Each is registered by the
file that implements it (``by_score.py``, ``by_random.py``, ``keep_all.py``, ``dpp.py``, ``weights.py``);
the recipe's ``select`` section takes its ``method`` names, its checks and any options sub-section
(``select.<key>``) from here. This module imports no heavy library, so the recipe can read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUDGETS = ("fraction", "count", "threshold")


@dataclass
class SelectContext:
    """What a selector sees: the recipe, the run folder, one row per example (``id``, ``domain``, ``label``
    and every score column, in the store's row order) and the strata of ``select.stratify`` (or None)."""

    recipe: Any
    run_dir: Path
    frame: Any  # polars.DataFrame
    strata: Any  # numpy object array or None

    @property
    def n(self) -> int:
        return int(self.frame.height)


@dataclass(frozen=True)
class Selector:
    """``run(ctx) -> (kept, info)``: the kept mask (bool, one per row) and what the manifest and report
    show of the selection (``info``: JSON-able; keys starting with ``_`` are per-row columns added to
    ``selection.parquet`` under the name without the underscore, e.g. DPP's pick order), or None.

    ``budgets``: which of ``select.fraction / count / threshold`` it takes (exactly one must be given; an
    empty tuple: none); ``stratify``: whether it honours ``select.stratify``; ``options``: the name and
    pydantic model of its own recipe sub-section ``select.<name>`` (always present in the recipe, with
    defaults, so that recipes stay comparable); ``check(recipe)``: a recipe-level problem (one line) or None;
    ``scores(select)``: the ``(recipe key, score column)`` pairs it reads, which must be scores the recipe
    computes.
    """

    name: str
    run: Callable[[SelectContext], tuple[Any, dict[str, Any] | None]]
    budgets: tuple[str, ...] = BUDGETS
    stratify: bool = True
    options: tuple[str, Any] | None = None
    check: Callable[[Any], str | None] = field(default=lambda recipe: None)
    scores: Callable[[Any], list[tuple[str, str | None]]] = field(default=lambda select: [])
    doc: str = ""


@dataclass(frozen=True)
class WeightMethod:
    """``weigh(scores, kept, config, strata) -> weights`` (float64; 0 on pruned rows, mean 1 over kept rows).
    ``needs_score``: it reads a score column (``select.weights.score``, default ``select.score``);
    ``options``: the ``select.weights`` keys it takes beyond ``method`` and ``score`` (a key it does not
    take must be left at its default)."""

    name: str
    weigh: Callable[..., Any]
    needs_score: bool = True
    options: tuple[str, ...] = ()
    family: str = ""  # how its errors name the group of methods it belongs to


SELECTORS: dict[str, Selector] = {}
WEIGHTS: dict[str, WeightMethod] = {}


def register_selector(s: Selector) -> Selector:
    if s.name in SELECTORS:
        raise ValueError(f"selector {s.name!r} is already registered")
    bad = set(s.budgets) - set(BUDGETS)
    if bad:
        raise ValueError(f"selector {s.name!r}: unknown budgets {sorted(bad)}; known: {BUDGETS}")
    SELECTORS[s.name] = s
    return s


def register_weights(w: WeightMethod) -> WeightMethod:
    if w.name in WEIGHTS:
        raise ValueError(f"weight method {w.name!r} is already registered")
    WEIGHTS[w.name] = w
    return w

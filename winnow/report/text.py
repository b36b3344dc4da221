"""Numbers and short texts as the report, its plots and the terminal summary print them."""

from __future__ import annotations

import math
from typing import Any


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.4g}"
    return str(x)


def _short(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _rows(n: int) -> str:
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _cut_text(cutoff: float | None, side: str | None) -> str:
    if cutoff is not None:
        return f"{_fmt(cutoff)} (kept rows score at or {'above' if side == 'high' else 'below'} it)"
    if side == "mixed":
        return "none: no single threshold on this score separates kept from pruned rows (stratified, banded or random)"
    return "–"

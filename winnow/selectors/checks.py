"""Argument checks shared by the selectors (numpy only): Python and numpy numbers, never bools."""

from __future__ import annotations

import numbers

import numpy as np


def is_int(x: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


def is_real(x: object) -> bool:
    """A real number (Python or numpy, integers included), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)

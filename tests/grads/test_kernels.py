"""The math on factors (winnow/grads/kernels.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from winnow.grads import Outer


def test_outer_factor_kinds():
    """One-hot and dense left factors give the same Gram whichever side is one-hot."""
    from winnow.grads.kernels import _left_gram

    ids = torch.tensor([[1, 3, 1]])
    dense = torch.randn(1, 2, 5, dtype=torch.float64)
    oh = F.one_hot(ids, 5).double()
    a = Outer(ids, torch.zeros(1, 3, 1, dtype=torch.float64))
    b = Outer(dense, torch.zeros(1, 2, 1, dtype=torch.float64))
    torch.testing.assert_close(_left_gram(a, b), oh @ dense.transpose(1, 2))
    torch.testing.assert_close(_left_gram(b, a), dense @ oh.transpose(1, 2))
    torch.testing.assert_close(_left_gram(a, a), oh @ oh.transpose(1, 2))

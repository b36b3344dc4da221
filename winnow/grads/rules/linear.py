"""``nn.Linear``: y = a W^T + b, so dL_b/dW = sum_t g_t a_t^T (Outer(g, a)) and dL_b/db = sum_t g_t
(Dense); any leading dimensions of the input are positions t."""

from __future__ import annotations

import torch
from torch import nn

from winnow.grads.rules.base import Dense, Factor, Outer, Record, Rule, abs_sum, batched, plain, register_rule


def _cast_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, keeping a padded row stride (a view of the real columns of a wider buffer, as the
    engine's aligned linear layers record) instead of packing the rows, which would unalign them; the new
    buffer's extra columns are zeros."""
    if x.dtype == dtype or x.dim() < 2 or x.stride(-1) != 1 or x.stride(-2) <= x.shape[-1]:
        return x.to(dtype)
    buf = torch.zeros(*x.shape[:-1], x.stride(-2), dtype=dtype, device=x.device)
    view = buf[..., : x.shape[-1]]
    view.copy_(x)
    return view


@register_rule(first=False)
class LinearRule(Rule[nn.Linear]):
    """``nn.Linear``: y = a W^T + b, so dL_b/dW = sum_t g_t a_t^T and dL_b/db = sum_t g_t."""

    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        return plain(module, nn.Linear)

    def kinds(self, module: nn.Linear) -> dict[str, str]:
        return {"weight": "outer", "bias": "dense"}

    def factors(
        self, module: nn.Linear, rec: Record, attrs: set[str], batch_size: int, dtype: torch.dtype
    ) -> dict[str, Factor]:
        B = batch_size
        a = batched(rec.input(), B, "its input", module).reshape(B, -1, module.in_features).to(dtype)
        g = _cast_rows(
            batched(rec.grad, B, "its output gradient", module).reshape(B, -1, module.out_features), dtype
        )
        out: dict[str, Factor] = {}
        if "weight" in attrs:
            padded = (
                rec.zero_padded
                and g.dim() == 3
                and g.stride(-2) > g.shape[-1]
                and g.stride(-1) == 1
                and g.stride(0) == g.stride(1) * g.shape[1]
            )
            out["weight"] = Outer(g, a, padded=padded)
        if "bias" in attrs:
            out["bias"] = Dense(g.sum(1), abs_sum(g, 1))
        return out

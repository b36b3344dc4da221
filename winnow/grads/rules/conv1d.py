"""transformers' ``Conv1D`` (GPT-2's linear layers): y = a W + b with W stored (in, out), so
dL_b/dW = sum_t a_t g_t^T (Outer(a, g)) and dL_b/db = sum_t g_t (Dense). Matched by class name and
module, so transformers is not imported."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from winnow.grads.rules.base import Dense, Factor, Outer, Record, Rule, abs_sum, batched, register_rule


@register_rule(first=False)
class Conv1DRule(Rule[Any]):
    """transformers' ``Conv1D`` (GPT-2): y = a W + b with W stored (in, out), so dL_b/dW = sum_t a_t g_t^T."""

    name = "hf_conv1d"

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        return (
            cls.__name__ == "Conv1D"
            and cls.__module__.startswith("transformers.")
            and isinstance(weight := getattr(module, "weight", None), torch.Tensor)
            and weight.dim() == 2
        )

    def kinds(self, module: Any) -> dict[str, str]:
        return {"weight": "outer", "bias": "dense"}

    def factors(
        self, module: Any, rec: Record, attrs: set[str], batch_size: int, dtype: torch.dtype
    ) -> dict[str, Factor]:
        B = batch_size
        d_in, d_out = module.weight.shape
        a = batched(rec.input(), B, "its input", module).reshape(B, -1, d_in).to(dtype)
        g = batched(rec.grad, B, "its output gradient", module).reshape(B, -1, d_out).to(dtype)
        out: dict[str, Factor] = {}
        if "weight" in attrs:
            out["weight"] = Outer(a, g)
        if "bias" in attrs:
            out["bias"] = Dense(g.sum(1), abs_sum(g, 1))
        return out

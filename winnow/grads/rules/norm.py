"""Elementwise-affine norms: dL_b/dp = sum_t g_t * dy_t/dp for the weight and the bias (Dense).

Matched: ``nn.LayerNorm``, ``nn.RMSNorm`` and any module whose class name ends in ``Norm`` holding only
``weight`` and/or ``bias`` of the shape of the output's trailing dims, e.g. ``LlamaRMSNorm``,
``T5LayerNorm``, Gemma's ``(1 + weight)`` RMSNorm. The output depends on parameter p elementwise,
y_t = xhat_t * p (+ bias), so dL_b/dp = sum_t g_t * dy_t/dp, and dy_t/dp = xhat_t, the normalised input
*before* the affine weight. For torch's own ``nn.LayerNorm`` / ``nn.RMSNorm`` xhat is recomputed from the
recorded input with the module's eps (``F.layer_norm`` / ``F.rms_norm`` without affine). For any other
norm, rather than re-derive xhat per family (mean subtracted or not, which eps attribute, upcasts,
``1 + weight``), the rule asks the module itself: one forward-mode ``jvp`` of the recorded call in the
direction ``ones_like(p)`` returns sum_i dy_{t,j}/dp_i = dy_{t,j}/dp_j exactly because the Jacobian is
diagonal. Batch-coupled norms (BatchNorm, GroupNorm, InstanceNorm) are not matched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from winnow.grads.rules.base import Dense, Factor, Record, Rule, abs_sum, batched, plain, register_rule


@register_rule(first=False)
class NormRule(Rule[Any]):
    """Elementwise-affine norms: dL_b/dp = sum_t g_t * dy_t/dp, with dy_t/dp from one jvp (module docstring)."""

    name = "norm"

    def matches(self, module: nn.Module) -> bool:
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)):
            return False
        if not (
            isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.lower().endswith("norm")
        ):
            return False
        own = dict(module.named_parameters(recurse=False))
        if not own or not set(own) <= {"weight", "bias"}:
            return False
        return not any(True for child in module.children() for _ in child.parameters())

    def kinds(self, module: Any) -> dict[str, str]:
        return {name: "dense" for name, _ in module.named_parameters(recurse=False)}

    @staticmethod
    def _plain_derivative(module: Any, rec: Record, attr: str) -> torch.Tensor | None:
        """dy/dp for torch's own LayerNorm / RMSNorm without a jvp: xhat, or 1 for the bias (None: other)."""
        if plain(module, nn.LayerNorm):
            if attr == "bias":
                assert rec.grad is not None
                return torch.ones((), dtype=rec.grad.dtype, device=rec.grad.device)
            return F.layer_norm(rec.input(), module.normalized_shape, None, None, module.eps)
        if plain(module, nn.RMSNorm) and attr == "weight":
            return F.rms_norm(rec.input(), module.normalized_shape, None, module.eps)
        return None

    def factors(
        self, module: Any, rec: Record, attrs: set[str], batch_size: int, dtype: torch.dtype
    ) -> dict[str, Factor]:
        B = batch_size
        g = batched(rec.grad, B, "its output gradient", module)
        own = {name: p.detach() for name, p in module.named_parameters(recurse=False)}
        out: dict[str, Factor] = {}
        for attr in sorted(attrs):
            p = own[attr]
            tangent = self._plain_derivative(module, rec, attr)
            if tangent is not None:
                prod = (g.to(dtype) * tangent.to(dtype)).reshape(B, -1, p.numel())
                out[attr] = Dense(prod.sum(1), abs_sum(prod, 1))
                continue

            def call(w: torch.Tensor, attr: str = attr) -> torch.Tensor:
                return torch.func.functional_call(module, {**own, attr: w}, rec.args, rec.kwargs)

            tangent = torch.func.jvp(call, (p,), (torch.ones_like(p),))[1]
            if (
                not isinstance(tangent, torch.Tensor)
                or tangent.shape != g.shape
                or tuple(tangent.shape[tangent.dim() - p.dim() :]) != tuple(p.shape)
            ):
                raise ValueError(
                    f"{type(module).__name__}: the norm rule needs an output whose trailing dimensions have "
                    f"the shape of its {attr!r} {tuple(p.shape)}; got output {tuple(g.shape)}"
                )
            prod = (g.to(dtype) * tangent.to(dtype)).reshape(B, -1, p.numel())
            out[attr] = Dense(prod.sum(1), abs_sum(prod, 1))
        return out

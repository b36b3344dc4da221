"""``nn.Conv2d`` (groups = 1) by im2col (Rochette et al., arXiv:1912.06015, Section 3): the weight
(out, in * kh * kw) gets Outer(g, unfold(a)) over the output positions l, the bias Dense(sum_l g_l).
The input is padded with the module's own padding mode before unfolding. Grouped and depthwise
convolutions are refused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from winnow.grads.rules.base import Dense, Factor, Outer, Record, Rule, abs_sum, batched, plain, register_rule


@register_rule(first=False)
class Conv2dRule(Rule[nn.Conv2d]):
    """``nn.Conv2d`` (groups = 1): im2col, then dL_b/dW = sum_l g_l unfold(a)_l^T over output positions l."""

    name = "conv2d"

    def matches(self, module: nn.Module) -> bool:
        return plain(module, nn.Conv2d)

    def problem(self, module: nn.Conv2d) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (grouped or depthwise convolution) has no rule"
        return None

    def kinds(self, module: nn.Conv2d) -> dict[str, str]:
        return {"weight": "outer", "bias": "dense"}

    def factors(
        self, module: nn.Conv2d, rec: Record, attrs: set[str], batch_size: int, dtype: torch.dtype
    ) -> dict[str, Factor]:
        B = batch_size
        x = batched(rec.input(), B, "its input", module)
        if x.dim() != 4:
            raise ValueError(f"Conv2d: input of shape {tuple(x.shape)}; the rule needs (B, C, H, W)")
        g = batched(rec.grad, B, "its output gradient", module)
        out: dict[str, Factor] = {}
        g = g.to(dtype).reshape(B, module.out_channels, -1)  # (B, out, L)
        if "weight" in attrs:
            x = x.to(dtype)
            pad = list(module._reversed_padding_repeated_twice)
            if any(pad):
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x = F.pad(x, pad, mode=mode)
            cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
            if cols.shape[-1] != g.shape[-1]:
                raise ValueError(
                    f"Conv2d: unfolded input has {cols.shape[-1]} positions, output {g.shape[-1]}"
                )
            out["weight"] = Outer(g.transpose(1, 2), cols.transpose(1, 2))
        if "bias" in attrs:
            out["bias"] = Dense(g.sum(2), abs_sum(g, 2))
        return out

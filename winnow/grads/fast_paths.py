"""The engine's exact speed substitutions, usable without the engine: wide unaligned linear layers
through a zero-padded weight, and transformers' ``gelu_new`` as the identical fused tanh GELU.

Linear layers with an output width cuBLAS handles badly (GPT-2's 50257-way head: 7x slower than at 50304
on an H100) compute through their weight zero-padded to a multiple of 64 and return a view of the real
columns; the engine records the padded output's gradient (``_winnow_padded``), whose zero columns let the
head's products run at the aligned width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fast_paths"]

_ALIGN = 64  # pad output widths to a multiple of this many features
_ALIGN_MIN_WIDTH = 4096  # only layers at least this wide (output vocabularies) are worth it


def _aligned_linear(module: nn.Linear, cuda_only: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward for ``module`` that multiplies by its weight zero-padded to a multiple of ``_ALIGN`` rows
    and returns the first ``out_features`` columns (a strided view): the same values and gradients (the
    padded rows are constants; their outputs are dropped), but cuBLAS gets aligned leading dimensions for
    the forward product and the backward's product with the output gradient. ``cuda_only``: other devices
    use the plain ``F.linear``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = module.weight, module.bias
        if cuda_only and not x.is_cuda:
            return F.linear(x, w, b)
        width = w.shape[0]
        pad = -width % _ALIGN
        wp = F.pad(w, (0, 0, 0, pad))
        bp = None if b is None else F.pad(b, (0, pad))
        full = F.linear(x, wp, bp)
        out = full[..., :width]
        out._winnow_padded = full  # type: ignore[attr-defined]  # the engine records the padded output's gradient
        return out

    return forward


def _is_new_gelu(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "NewGELUActivation" and cls.__module__ == "transformers.activations"


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``NewGELUActivation`` (GPT-2's ``gelu_new``), 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
    x^3))), is exactly ``F.gelu(approximate="tanh")``: one fused kernel (each way) instead of eight
    elementwise passes that round to bf16 in between (~15% of a GPT-2-small forward and backward)."""
    return F.gelu(x, approximate="tanh")


class fast_paths:
    """Context manager: the engine's exact speed substitutions, usable without the engine (a frozen reference
    model, a proxy's training step; the engine applies them itself while open): plain ``nn.Linear`` layers at
    least 4096 wide whose width is not a multiple of 64 compute through a zero-padded weight (``align``:
    ``"auto"`` on CUDA inputs only, ``True`` everywhere, ``False`` never; ``linears``: only these modules),
    and transformers' ``gelu_new`` runs as the identical fused ``F.gelu(approximate="tanh")``
    (``fuse_activations``). Modules that already have an instance ``forward`` are left alone; exit restores
    the patched modules' ``forward``."""

    def __init__(
        self,
        model: nn.Module,
        align: str | bool = "auto",
        fuse_activations: bool = True,
        linears: Sequence[nn.Module] | None = None,
    ) -> None:
        if align not in ("auto", True, False):
            raise ValueError(f"align must be 'auto', True or False, got {align!r}")
        self.model, self.align, self.fuse = model, align, fuse_activations
        self.linears = None if linears is None else {id(m) for m in linears}
        self.patched: list[nn.Module] = []

    def __enter__(self) -> fast_paths:
        for module in self.model.modules():
            if "forward" in module.__dict__:
                continue
            forward: Callable[[torch.Tensor], torch.Tensor]
            if self.fuse and _is_new_gelu(module):
                forward = _tanh_gelu
            elif (
                self.align is not False
                and type(module) is nn.Linear
                and module.out_features % _ALIGN
                and module.out_features >= _ALIGN_MIN_WIDTH
                and (self.linears is None or id(module) in self.linears)
            ):
                forward = _aligned_linear(module, cuda_only=self.align == "auto")
            else:
                continue
            module.forward = forward  # an instance attribute: __exit__ pops it
            self.patched.append(module)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module in self.patched:
            module.__dict__.pop("forward", None)
        self.patched = []

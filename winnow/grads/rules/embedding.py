"""``nn.Embedding``: dL_b/dE = sum_t e_{id_t} g_t^T, Outer(ids, g) with a one-hot left side that the
engine compares or gathers, never expands; g = 0 where id = ``padding_idx`` (autograd never updates that
row). Refused with ``scale_grad_by_freq`` (a row's gradient is scaled by its frequency in the whole
batch)."""

from __future__ import annotations

import torch
from torch import nn

from winnow.grads.rules.base import Factor, Outer, Record, Rule, batched, plain, register_rule


@register_rule(first=False)
class EmbeddingRule(Rule[nn.Embedding]):
    """``nn.Embedding``: dL_b/dE = sum_t e_{id_t} g_t^T; the ``padding_idx`` row gets no gradient."""

    name = "embedding"

    def matches(self, module: nn.Module) -> bool:
        return plain(module, nn.Embedding)

    def problem(self, module: nn.Embedding) -> str | None:
        if module.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True scales each row's gradient by its frequency in the whole batch, "
                "so the examples have no separate gradients"
            )
        return None

    def kinds(self, module: nn.Embedding) -> dict[str, str]:
        return {"weight": "outer"}

    def factors(
        self, module: nn.Embedding, rec: Record, attrs: set[str], batch_size: int, dtype: torch.dtype
    ) -> dict[str, Factor]:
        B = batch_size
        ids = batched(rec.input(), B, "its input ids", module).reshape(B, -1).long()
        g = batched(rec.grad, B, "its output gradient", module).reshape(B, -1, module.embedding_dim).to(dtype)
        if module.padding_idx is not None:
            g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
        return {"weight": Outer(ids, g)} if "weight" in attrs else {}

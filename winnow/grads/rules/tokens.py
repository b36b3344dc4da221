"""Learned tokens and position tables that a module puts into its output directly (ViT's ``cls_token``
and ``position_embeddings``, DeiT's distillation token, register tokens): Dense, from one replay and
vector-Jacobian product per example. Registered last: the exact fallback for small directly-used
parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from winnow.grads.rules.base import Dense, Factor, Record, Rule, batched, register_rule


@register_rule(first=False)
class TokenParamsRule(Rule[Any]):
    """Learned tokens and position tables a module puts into its output directly, e.g. ViT's
    ``cls_token`` and ``position_embeddings`` (``ViTEmbeddings``), DeiT's distillation token, register
    tokens.

    No closed form is assumed: for each example b the rule replays the recorded call on that example
    alone (``functional_call`` with the module's own parameters) and takes the vector-Jacobian product
    with g_b, so the result is exact for any such module that treats examples independently. Cost: B
    small forward+backward calls of the module (its child modules' parameters are not differentiated
    here; their own rules cover them). Matched only for modules whose own parameters (not their
    children's) all have one of the names in ``token_names`` and total at most ``max_numel`` elements.
    """

    name = "token_params"
    max_numel = 1 << 22
    # Only parameters known to be learned tokens or position tables: a replay is exact for any module
    # that treats examples independently, but that is a property of the module the rule cannot see, so
    # other parameters stay refused rather than answered on trust.
    token_names = frozenset(
        {
            "cls_token",
            "mask_token",
            "distillation_token",
            "register_tokens",
            "position_embeddings",
            "position_embedding",
        }
    )

    def matches(self, module: nn.Module) -> bool:
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            return False
        own = dict(module.named_parameters(recurse=False))
        return (
            bool(own)
            and set(own) <= self.token_names
            and sum(p.numel() for p in own.values()) <= self.max_numel
        )

    def kinds(self, module: Any) -> dict[str, str]:
        return {name: "dense" for name, _ in module.named_parameters(recurse=False)}

    def factors(
        self, module: Any, rec: Record, attrs: set[str], batch_size: int, dtype: torch.dtype
    ) -> dict[str, Factor]:
        B = batch_size
        g = batched(rec.grad, B, "its output gradient", module)
        own = {name: p.detach() for name, p in module.named_parameters(recurse=False)}
        names = sorted(attrs)

        def pick(x: Any, b: int) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B:
                return x[b : b + 1]
            return x

        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for b in range(B):
            args = tuple(pick(x, b) for x in rec.args)
            kwargs = {k: pick(v, b) for k, v in rec.kwargs.items()}

            def call(*ps: torch.Tensor, args: tuple = args, kwargs: dict = kwargs) -> torch.Tensor:
                return torch.func.functional_call(
                    module, {**own, **dict(zip(names, ps, strict=True))}, args, kwargs
                )

            with torch.enable_grad():
                out, vjp = torch.func.vjp(call, *[own[n] for n in names])[:2]
                if not isinstance(out, torch.Tensor) or out.shape[1:] != g.shape[1:]:
                    raise ValueError(
                        f"{type(module).__name__}: replaying one example gave output "
                        f"{getattr(out, 'shape', type(out))}, expected (1, *{tuple(g.shape[1:])})"
                    )
                grads = vjp(g[b : b + 1].to(out.dtype))
            for n, gr in zip(names, grads, strict=True):
                rows[n].append(gr.reshape(-1).to(dtype))
        return {n: Dense(torch.stack(rows[n])) for n in names}

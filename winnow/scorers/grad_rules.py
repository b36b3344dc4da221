"""Per-layer-type rules of the per-example gradient engine (:mod:`winnow.scorers.grad_engine`).

During one batched forward the engine records, for every module that owns a selected parameter, the
arguments the module was called with (its input activations ``a``, or the token ids of an embedding);
during the one backward it records the gradient ``g`` of the loss with respect to the module's output.
A rule turns one such call (``a``, ``g``) into *factors* of the per-example gradient of each parameter
of the module, for the B examples of the batch at once:

* :class:`Outer`: the parameter, viewed as an (m, n) matrix ``p.view(p.shape[0], -1)``, has the
  per-example gradient ``grad_b = sum_t left[b, t] right[b, t]^T`` (a sum of outer products over the
  positions t of the example: tokens of a sequence, pixels of a feature map). ``left`` is a float
  tensor (B, T, m), or a long tensor (B, T) of row indices standing for one-hot vectors e_id in R^m
  (an embedding lookup), which the engine never expands.
* :class:`Dense`: the per-example gradient itself, flattened, (B, numel): used for vectors (biases,
  norm weights), whose per-example gradients are no larger than one row of activations.

This is the factorisation of Goodfellow, "Efficient Per-Example Gradient Computations",
arXiv:1510.01799 (2015), Section 3: for a linear layer z_t = W a_t, dL_b/dW = sum_t g_t a_t^T with
g_t = dL_b/dz_t; Rochette et al., "Efficient Per-Example Gradient Computations in Convolutional Neural
Networks", arXiv:1912.06015 (2019), Section 3, extend it to convolutions by unfolding the input
(im2col). The rules, with the factors they produce (B examples, T positions, U calls of the module):

=================  ==========================================================  =======================
module             factors per call                                            notes
=================  ==========================================================  =======================
``nn.Linear``      weight (out, in): Outer(g, a); bias: Dense(sum_t g_t)       any leading dims -> T
HF ``Conv1D``      weight (in, out): Outer(a, g); bias: Dense(sum_t g_t)       GPT-2's linear layers
``nn.Embedding``   weight (V, d): Outer(ids, g), g = 0 where id = padding_idx  one-hot rows, gathered
norms              weight / bias: Dense(sum_t g_t * dy_t/dp)                   dy/dp: xhat, or a jvp
``nn.Conv2d``      weight (out, in*kh*kw): Outer(g, unfold(a)); bias: Dense    groups = 1
learned tokens     cls/position tables (ViT): Dense, one replay+vjp per example  TokenParamsRule
=================  ==========================================================  =======================

Norms (``nn.LayerNorm``, ``nn.RMSNorm`` and any module whose class name ends in ``Norm`` holding only
``weight`` and/or ``bias`` of the shape of the output's trailing dims, e.g. ``LlamaRMSNorm``,
``T5LayerNorm``, Gemma's ``(1 + weight)`` RMSNorm): the output depends on parameter p elementwise,
y_t = xhat_t * p (+ bias), so dL_b/dp = sum_t g_t * dy_t/dp, and dy_t/dp = xhat_t, the normalised input
*before* the affine weight. For torch's own ``nn.LayerNorm`` / ``nn.RMSNorm`` xhat is recomputed from the
recorded input with the module's eps (``F.layer_norm`` / ``F.rms_norm`` without affine). For any other
norm, rather than re-derive xhat per family (mean subtracted or not, which eps attribute, upcasts,
``1 + weight``), the rule asks the module itself: one forward-mode ``jvp`` of the recorded call in the
direction ``ones_like(p)`` returns sum_i dy_{t,j}/dp_i = dy_{t,j}/dp_j exactly because the Jacobian is
diagonal. Batch-coupled norms (BatchNorm, GroupNorm, InstanceNorm) are not
matched.

Rules refuse what they cannot compute exactly (``problem``): embeddings with ``scale_grad_by_freq``
(the gradient of a row is scaled by its frequency in the whole batch) and grouped convolutions. A
module matches only when its class does not override the base class's ``forward`` (a subclass that
rescales its output, e.g. a scaled word embedding, would make the factors wrong), so an unknown
subclass is reported as unsupported instead of answered wrongly.

Extend with :func:`register_rule`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RULES",
    "TokenParamsRule",
    "Conv1DRule",
    "Conv2dRule",
    "Dense",
    "EmbeddingRule",
    "LinearRule",
    "NormRule",
    "Outer",
    "Record",
    "Rule",
    "find_rule",
    "register_rule",
]


@dataclass
class Record:
    """One recorded call of a module: its arguments (detached) and the gradient of its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad: torch.Tensor | None = field(default=None)
    # grad is a view of the first columns of a buffer whose other columns (up to grad's row stride) are
    # zeros: the engine's aligned linear layers record the padded output's gradient this way
    zero_padded: bool = False

    def input(self) -> torch.Tensor:
        """The module's main input: the first positional tensor, else the first tensor keyword."""
        for x in self.args:
            if isinstance(x, torch.Tensor):
                return x
        for x in self.kwargs.values():
            if isinstance(x, torch.Tensor):
                return x
        raise ValueError("the module was called without a tensor argument")


@dataclass
class Outer:
    """Per-example gradient ``sum_t left[b, t] right[b, t]^T`` of a parameter viewed as (m, n).

    ``left``: float (B, T, m), or long (B, T) row indices (one-hot vectors in R^m); ``right``: (B, T, n).
    """

    left: torch.Tensor
    right: torch.Tensor
    # left's rows continue in memory with zeros up to its row stride (an aligned layer's padded gradient)
    padded: bool = False

    @property
    def onehot(self) -> bool:
        return not self.left.is_floating_point()

    def wide_left(self) -> torch.Tensor:
        """``left``, or for a padded factor, ``left`` widened over its zero columns to its row stride: the
        same inner products between rows, with an aligned width for the matrix products."""
        x = self.left
        if not self.padded:
            return x
        return x.as_strided((*x.shape[:-1], x.stride(-2)), x.stride())


@dataclass
class Dense:
    """Per-example gradient of a parameter, flattened: ``value`` (B, numel).

    ``scale`` (B, numel), optional: the sums of the absolute values of the terms that ``value`` adds up
    (sum_t |g_t|), the size of the rounding errors of the batch gradient that the engine's consistency
    check allows for (a key bias, whose exact gradient is 0, is pure rounding noise). A callable giving
    it is evaluated only when the check runs (a full pass over the output gradient otherwise wasted)."""

    value: torch.Tensor
    scale: torch.Tensor | Callable[[], torch.Tensor] | None = None

    def scale_value(self) -> torch.Tensor | None:
        return self.scale() if callable(self.scale) else self.scale


Factor = Outer | Dense


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` is a ``base`` whose class keeps ``base.forward`` (so the rule's algebra holds)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _batched(x: torch.Tensor | None, batch_size: int, what: str, module: nn.Module) -> torch.Tensor:
    if x is not None and x.dim() >= 2 and x.shape[0] == 1 and batch_size > 1:
        raise ValueError(
            f"{type(module).__name__}: {what} has shape {tuple(x.shape)}: the module was called once for the "
            f"whole batch of {batch_size} examples (e.g. position ids of shape (1, T) broadcast over the batch), "
            f"so its output gradient is summed over the examples; call it on batch-shaped inputs "
            f"(e.g. position_ids of shape (B, T), as per_example_loss does) or leave its parameters out"
        )
    if x is None or x.dim() < 2 or x.shape[0] != batch_size:
        shape = None if x is None else tuple(x.shape)
        raise ValueError(
            f"{type(module).__name__}: {what} has shape {shape}, whose first dimension is not the batch of "
            f"{batch_size} examples; the engine needs modules applied to batch-first tensors"
        )
    return x


class Rule(abc.ABC):
    """A per-layer-type rule: which modules it covers and how it factors their parameters' gradients."""

    name: str = ""

    @abc.abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether this rule covers ``module``."""

    def problem(self, module: nn.Module) -> str | None:
        """Why a matched module cannot be handled exactly (None: it can)."""
        return None

    @abc.abstractmethod
    def kinds(self, module: nn.Module) -> dict[str, str]:
        """``{parameter attribute: "outer" | "dense"}`` for the parameters this rule covers."""

    @abc.abstractmethod
    def factors(
        self, module: nn.Module, rec: Record, attrs: set[str], batch_size: int, dtype: torch.dtype
    ) -> dict[str, Factor]:
        """Factors of the per-example gradients of ``attrs`` from one recorded call, in ``dtype``."""


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


class LinearRule(Rule):
    """``nn.Linear``: y = a W^T + b, so dL_b/dW = sum_t g_t a_t^T and dL_b/db = sum_t g_t."""

    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        return _plain(module, nn.Linear)

    def kinds(self, module: nn.Module) -> dict[str, str]:
        return {"weight": "outer", "bias": "dense"}

    def factors(self, module, rec, attrs, batch_size, dtype):
        B = batch_size
        a = _batched(rec.input(), B, "its input", module).reshape(B, -1, module.in_features).to(dtype)
        g = _cast_rows(
            _batched(rec.grad, B, "its output gradient", module).reshape(B, -1, module.out_features), dtype
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
            out["bias"] = Dense(g.sum(1), lambda g=g: g.abs().sum(1))
        return out


class Conv1DRule(Rule):
    """transformers' ``Conv1D`` (GPT-2): y = a W + b with W stored (in, out), so dL_b/dW = sum_t a_t g_t^T."""

    name = "hf_conv1d"

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        return (
            cls.__name__ == "Conv1D"
            and cls.__module__.startswith("transformers.")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2
        )

    def kinds(self, module: nn.Module) -> dict[str, str]:
        return {"weight": "outer", "bias": "dense"}

    def factors(self, module, rec, attrs, batch_size, dtype):
        B = batch_size
        d_in, d_out = module.weight.shape
        a = _batched(rec.input(), B, "its input", module).reshape(B, -1, d_in).to(dtype)
        g = _batched(rec.grad, B, "its output gradient", module).reshape(B, -1, d_out).to(dtype)
        out: dict[str, Factor] = {}
        if "weight" in attrs:
            out["weight"] = Outer(a, g)
        if "bias" in attrs:
            out["bias"] = Dense(g.sum(1), lambda g=g: g.abs().sum(1))
        return out


class EmbeddingRule(Rule):
    """``nn.Embedding``: dL_b/dE = sum_t e_{id_t} g_t^T; the ``padding_idx`` row gets no gradient."""

    name = "embedding"

    def matches(self, module: nn.Module) -> bool:
        return _plain(module, nn.Embedding)

    def problem(self, module: nn.Module) -> str | None:
        if module.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True scales each row's gradient by its frequency in the whole batch, "
                "so the examples have no separate gradients"
            )
        return None

    def kinds(self, module: nn.Module) -> dict[str, str]:
        return {"weight": "outer"}

    def factors(self, module, rec, attrs, batch_size, dtype):
        B = batch_size
        ids = _batched(rec.input(), B, "its input ids", module).reshape(B, -1).long()
        g = (
            _batched(rec.grad, B, "its output gradient", module)
            .reshape(B, -1, module.embedding_dim)
            .to(dtype)
        )
        if module.padding_idx is not None:
            g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
        return {"weight": Outer(ids, g)} if "weight" in attrs else {}


class NormRule(Rule):
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

    def kinds(self, module: nn.Module) -> dict[str, str]:
        return {name: "dense" for name, _ in module.named_parameters(recurse=False)}

    @staticmethod
    def _plain_derivative(module: nn.Module, rec: Record, attr: str) -> torch.Tensor | None:
        """dy/dp for torch's own LayerNorm / RMSNorm without a jvp: xhat, or 1 for the bias (None: other)."""
        if _plain(module, nn.LayerNorm):
            if attr == "bias":
                return torch.ones((), dtype=rec.grad.dtype, device=rec.grad.device)
            return F.layer_norm(rec.input(), module.normalized_shape, None, None, module.eps)
        if _plain(module, nn.RMSNorm) and attr == "weight":
            return F.rms_norm(rec.input(), module.normalized_shape, None, module.eps)
        return None

    def factors(self, module, rec, attrs, batch_size, dtype):
        B = batch_size
        g = _batched(rec.grad, B, "its output gradient", module)
        own = {name: p.detach() for name, p in module.named_parameters(recurse=False)}
        out: dict[str, Factor] = {}
        for attr in sorted(attrs):
            p = own[attr]
            tangent = self._plain_derivative(module, rec, attr)
            if tangent is not None:
                prod = (g.to(dtype) * tangent.to(dtype)).reshape(B, -1, p.numel())
                out[attr] = Dense(prod.sum(1), lambda prod=prod: prod.abs().sum(1))
                continue

            def call(w: torch.Tensor, attr: str = attr) -> torch.Tensor:
                return torch.func.functional_call(module, {**own, attr: w}, rec.args, rec.kwargs)

            _, tangent = torch.func.jvp(call, (p,), (torch.ones_like(p),))
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
            out[attr] = Dense(prod.sum(1), lambda prod=prod: prod.abs().sum(1))
        return out


class Conv2dRule(Rule):
    """``nn.Conv2d`` (groups = 1): im2col, then dL_b/dW = sum_l g_l unfold(a)_l^T over output positions l."""

    name = "conv2d"

    def matches(self, module: nn.Module) -> bool:
        return _plain(module, nn.Conv2d)

    def problem(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (grouped or depthwise convolution) has no rule"
        return None

    def kinds(self, module: nn.Module) -> dict[str, str]:
        return {"weight": "outer", "bias": "dense"}

    def factors(self, module, rec, attrs, batch_size, dtype):
        B = batch_size
        x = _batched(rec.input(), B, "its input", module)
        if x.dim() != 4:
            raise ValueError(f"Conv2d: input of shape {tuple(x.shape)}; the rule needs (B, C, H, W)")
        g = _batched(rec.grad, B, "its output gradient", module)
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
            out["bias"] = Dense(g.sum(2), lambda g=g: g.abs().sum(2))
        return out


class TokenParamsRule(Rule):
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

    def kinds(self, module: nn.Module) -> dict[str, str]:
        return {name: "dense" for name, _ in module.named_parameters(recurse=False)}

    def factors(self, module, rec, attrs, batch_size, dtype):
        B = batch_size
        g = _batched(rec.grad, B, "its output gradient", module)
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

            def call(*ps: torch.Tensor, args=args, kwargs=kwargs) -> torch.Tensor:
                return torch.func.functional_call(
                    module, {**own, **dict(zip(names, ps, strict=True))}, args, kwargs
                )

            with torch.enable_grad():
                out, vjp = torch.func.vjp(call, *[own[n] for n in names])
                if not isinstance(out, torch.Tensor) or out.shape[1:] != g.shape[1:]:
                    raise ValueError(
                        f"{type(module).__name__}: replaying one example gave output "
                        f"{getattr(out, 'shape', type(out))}, expected (1, *{tuple(g.shape[1:])})"
                    )
                grads = vjp(g[b : b + 1].to(out.dtype))
            for n, gr in zip(names, grads, strict=True):
                rows[n].append(gr.reshape(-1).to(dtype))
        return {n: Dense(torch.stack(rows[n])) for n in names}


# TokenParamsRule comes last: it is the exact fallback for small directly-used parameters.
RULES: list[Rule] = [LinearRule(), Conv1DRule(), EmbeddingRule(), NormRule(), Conv2dRule(), TokenParamsRule()]


def register_rule(rule: Rule, *, first: bool = True) -> Rule:
    """Add ``rule`` to :data:`RULES` (tried before the built-in rules when ``first``)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule expects a Rule, got {rule!r}")
    if first:
        RULES.insert(0, rule)
    else:
        RULES.append(rule)
    return rule


def find_rule(module: nn.Module) -> Rule | None:
    """The first rule of :data:`RULES` that matches ``module``, or None."""
    for rule in RULES:
        if rule.matches(module):
            return rule
    return None

"""What a per-layer rule is, the factors it returns, and the ordered registry of rules.

During one batched forward the engine records, for every module that owns a selected parameter, the
arguments the module was called with (its input activations ``a``, or the token ids of an embedding);
during the one backward it records the gradient ``g`` of the loss with respect to the module's output
(a :class:`Record`). A :class:`Rule` turns one such call (``a``, ``g``) into *factors* of the per-example
gradient of each parameter of the module, for the B examples of the batch at once:

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
(im2col).

Rules are tried in the order of :data:`RULES` and the first that matches a module is used. The built-in
rules (one module each in this package) register themselves with ``@register_rule(first=False)`` when
:mod:`winnow.grads.rules` imports them, in this order: linear, hf_conv1d, embedding, norm, conv2d,
token_params (the exact fallback for small directly-used parameters comes last). Rules registered later
with :func:`register_rule` go before them by default.

A rule refuses what it cannot compute exactly (``problem``), and a built-in rule matches a module only
when its class does not override the base class's ``forward`` (:func:`plain`: a subclass that rescales
its output, e.g. a scaled word embedding, would make the factors wrong), so an unknown subclass is
reported as unsupported instead of answered wrongly.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

import torch
from torch import nn

__all__ = [
    "RULES",
    "Dense",
    "Factor",
    "Outer",
    "Record",
    "Rule",
    "abs_sum",
    "batched",
    "find_rule",
    "plain",
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


def abs_sum(x: torch.Tensor, dim: int) -> Callable[[], torch.Tensor]:
    """A :class:`Dense` ``scale`` evaluated only when the check runs: ``x.abs().sum(dim)``."""
    return lambda: x.abs().sum(dim)


def plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` is a ``base`` whose class keeps ``base.forward`` (so the rule's algebra holds)."""
    return isinstance(module, base) and type(module).forward is base.forward


def batched(x: torch.Tensor | None, batch_size: int, what: str, module: nn.Module) -> torch.Tensor:
    """``x`` if it is batch-first for ``batch_size`` examples, else a ``ValueError`` that says why."""
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


M = TypeVar("M", bound=nn.Module)


class Rule(abc.ABC, Generic[M]):
    """A per-layer-type rule: which modules it covers and how it factors their parameters' gradients.

    ``M``: the module type the rule covers (what :meth:`matches` accepts), for the type checker."""

    name: str = ""

    @abc.abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether this rule covers ``module``."""

    def problem(self, module: M) -> str | None:
        """Why a matched module cannot be handled exactly (None: it can)."""
        return None

    @abc.abstractmethod
    def kinds(self, module: M) -> dict[str, str]:
        """``{parameter attribute: "outer" | "dense"}`` for the parameters this rule covers."""

    @abc.abstractmethod
    def factors(
        self, module: M, rec: Record, attrs: set[str], batch_size: int, dtype: torch.dtype
    ) -> dict[str, Factor]:
        """Factors of the per-example gradients of ``attrs`` from one recorded call, in ``dtype``."""


RULES: list[Rule[Any]] = []


@overload
def register_rule(rule: Rule[Any], *, first: bool = True) -> Rule[Any]: ...
@overload
def register_rule(rule: type[Rule[Any]], *, first: bool = True) -> type[Rule[Any]]: ...
@overload
def register_rule(
    rule: None = None, *, first: bool = True
) -> Callable[[type[Rule[Any]]], type[Rule[Any]]]: ...
def register_rule(rule: Rule[Any] | type[Rule[Any]] | None = None, *, first: bool = True) -> Any:
    """Add a rule to :data:`RULES` (tried before the rules already there when ``first``).

    ``rule``: a :class:`Rule` instance (returned), or a :class:`Rule` subclass, instantiated with no
    arguments (the class is returned, so this works as a class decorator: ``@register_rule``, or
    ``@register_rule(first=False)`` to append)."""
    if rule is None:
        return lambda cls: register_rule(cls, first=first)
    instance = rule() if isinstance(rule, type) and issubclass(rule, Rule) else rule
    if not isinstance(instance, Rule):
        raise TypeError(f"register_rule expects a Rule, got {rule!r}")
    if first:
        RULES.insert(0, instance)
    else:
        RULES.append(instance)
    return rule


def find_rule(module: nn.Module) -> Rule[Any] | None:
    """The first rule of :data:`RULES` that matches ``module``, or None."""
    for rule in RULES:
        if rule.matches(module):
            return rule
    return None

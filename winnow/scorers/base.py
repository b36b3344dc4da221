"""Scorer base class, parameter specs and the scorer registry.

A scorer turns one batch and one model into per-example scores:

    scorer = get_scorer("el2n", reduction="mean")
    scores = scorer.score_batch(model, batch, task="causal_lm")   # {"el2n": float32 tensor (B,)}

The compute layer imports torch (and numpy / transformers model types) only; see
docs/ARCHITECTURE.md, "Scorer interface", for the batch conventions of each task.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from winnow.grads.losses import classification_inputs, model_logits, next_token_positions  # noqa: F401

TASKS: frozenset[str] = frozenset({"causal_lm", "sequence_classification", "image_classification"})


@dataclass(frozen=True)
class Param:
    """Specification of one scorer parameter.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str``. ``choices`` restricts the value to a set;
    ``min`` / ``max`` bound numbers (inclusive unless ``min_exclusive``). ``doc`` is a short phrase.
    """

    default: Any
    type: type
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    doc: str = ""

    def expected(self) -> str:
        """Human-readable description of valid values, e.g. ``"an int > 0"``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        article = "an" if self.type.__name__[0] in "aeiou" else "a"
        text = f"{article} {self.type.__name__}"
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        if self.max is not None:
            bounds.append(f"<= {self.max:g}")
        return text + (" " + " and ".join(bounds) if bounds else "")

    def validate(self, scorer: str, name: str, value: Any) -> Any:
        """Return ``value`` (ints widened to float for float params) or raise a one-line ``ValueError``."""
        bad = ValueError(f"scorer {scorer!r}: parameter {name!r} must be {self.expected()}, got {value!r}")
        if self.type is bool:
            if not isinstance(value, bool):
                raise bad
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            value = float(value)
        elif not isinstance(value, self.type):
            raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        if self.min is not None and (value <= self.min if self.min_exclusive else value < self.min):
            raise bad
        if self.max is not None and value > self.max:
            raise bad
        return value


class Scorer(abc.ABC):
    """Base class of all scorers.

    Subclasses set ``name``, ``tasks``, ``columns`` (the keys :meth:`score_batch` returns; empty means
    just ``(name,)``) and ``PARAMS`` (name -> :class:`Param`) and implement :meth:`score_batch`. Parameters are validated in ``__init__`` and stored as attributes of the same
    name; :meth:`params` returns them as a JSON-able dict (recorded as provenance).
    """

    name: ClassVar[str] = ""
    tasks: ClassVar[frozenset[str]] = frozenset()
    columns: ClassVar[tuple[str, ...]] = ()
    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            valid = ", ".join(sorted(self.PARAMS)) or "(none)"
            raise ValueError(
                f"scorer {self.name!r}: unknown parameter {unknown[0]!r}; valid parameters: {valid}"
            )
        for key, spec in self.PARAMS.items():
            value = params.get(key, spec.default)
            setattr(self, key, spec.validate(self.name, key, value))

    def params(self) -> dict[str, Any]:
        """JSON-able parameters of this scorer (every parameter, defaults included)."""
        return {key: getattr(self, key) for key in self.PARAMS}

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(
                f"scorer {self.name!r} does not support task {task!r}; supported: {', '.join(sorted(self.tasks))}"
            )

    @abc.abstractmethod
    def score_batch(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
    ) -> dict[str, torch.Tensor]:
        """Score one batch: ``{column: float32 tensor (B,)}`` on the model's device."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: add ``cls`` to :data:`SCORERS` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"register expects a Scorer subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if not cls.tasks or not cls.tasks <= TASKS:
        raise ValueError(
            f"{cls.__name__}.tasks must be a non-empty subset of {sorted(TASKS)}, got {cls.tasks}"
        )
    if cls.name in SCORERS and SCORERS[cls.name] is not cls:
        raise ValueError(f"scorer name {cls.name!r} is already registered by {SCORERS[cls.name].__name__}")
    SCORERS[cls.name] = cls
    return cls


def get_scorer(name: str, **params: Any) -> Scorer:
    """Build the scorer registered as ``name`` with ``params``.

    Raises ``ValueError`` naming an unknown scorer (and the valid names) or an unknown / invalid
    parameter (and what it expects).
    """
    cls = SCORERS.get(name)
    if cls is None:
        raise ValueError(f"unknown scorer {name!r}; valid scorers: {', '.join(sorted(SCORERS)) or '(none)'}")
    return cls(**params)


# ----------------------------------------------------------------------------------------------
# helpers shared by the scorers


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run with the model in eval mode (dropout off), restoring its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)

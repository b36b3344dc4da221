"""What a domain-mixture method is, and the registry that the recipe and the loop find methods in.

A method is one file in this package: a config model (its recipe options, on top of the options every
method shares) and a :class:`MixtureMethod` that either gives static weights or plugs a set-up and a step
into the shared training loop of :mod:`winnow.pipeline.mixtures.loop`. ``register`` adds it to
:data:`MIXTURE_METHODS`; ``winnow.pipeline.mixtures`` imports every method file, and the recipe's
``mixture`` section is the discriminated union (on ``method``) of the registered configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from winnow.pipeline.config import Device, Strict


class MixtureCommon(Strict):
    """Options every mixture method takes (the proxy's training, the output). Subclasses add
    ``method: Literal["name"]`` and their own options."""

    method: str
    target_domains: list[str] = Field(
        default_factory=list,
        description="doge/dga: domains used as the target "
        "(held out of training); doge without them: the universal target",
    )
    steps: int = Field(default=200, gt=0, description="proxy steps")
    batch_size: int = Field(default=16, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    seed: int = 0
    device: Device = "auto"
    output: Literal["auto", "average", "final"] = Field(
        default="auto", description="mixture.json weights: the average over steps (doremi, doge) or the final"
    )


@dataclass
class MixtureRun:
    """What a method's set-up and step see: the run's domains, its proxy and its batches.

    ``names``: every domain (sorted); ``train_ids`` / ``target_ids``: indices into ``names`` of the domains
    the mixture weighs and of the held-out target domains; ``tokens``: the training domains' token counts.
    """

    recipe: Any
    config: Any
    names: list[str]
    train_ids: list[int]
    target_ids: list[int]
    tokens: np.ndarray
    device: Any = None
    amp: Any = None
    sampler: Any = None
    model: Any = None
    feat: Any = None
    tokenizer: Any = None
    progress: Any = None
    state: dict[str, Any] = field(default_factory=dict)

    def batch(self, examples: list[Any]) -> dict[str, Any]:
        return {k: v.to(self.device) for k, v in self.feat.collate(examples).items()}


class MixtureMethod:
    """A mixture method. Static methods implement :meth:`static_weights`; trained ones set ``trains`` and
    implement :meth:`step` (and :meth:`setup` / :meth:`close` if they hold state)."""

    name: ClassVar[str] = ""
    config: ClassVar[type[MixtureCommon]] = MixtureCommon
    trains: ClassVar[bool] = False
    default_output: ClassVar[str] = "average"  # mixture.json's weights when output is "auto"

    def check(self, run: MixtureRun) -> str | None:
        """A problem with the data for this method (one line), or None."""
        return None

    def static_weights(self, run: MixtureRun) -> np.ndarray:
        raise TypeError(f"mixture method {self.name!r} trains a proxy; it has no static weights")

    def setup(self, run: MixtureRun) -> None:
        """Before the first step (the proxy exists; the weights are uniform)."""

    def step(self, run: MixtureRun, step: int, alpha: Any, lr: float) -> Any:
        """One proxy step: leave the gradients of the proxy's loss in ``.grad`` (the loop clips and steps
        the optimizer) and return the weights α_t (float64, over the training domains)."""
        raise TypeError(f"mixture method {self.name!r} has static weights; it takes no steps")

    def average_from(self, run: MixtureRun) -> int:
        """The first step whose weights count in the average output (1: every step)."""
        return 1

    def close(self, run: MixtureRun) -> None:
        """After the last step, also when the loop fails."""


MIXTURE_METHODS: dict[str, MixtureMethod] = {}


def register(method: type[MixtureMethod]) -> type[MixtureMethod]:
    """Class decorator: add a mixture method under ``method.name`` (its config's ``method`` literal)."""
    if not method.name:
        raise ValueError(f"{method.__name__} has no name")
    tag = method.config.model_fields["method"].annotation
    if getattr(tag, "__args__", None) != (method.name,):
        raise ValueError(f"{method.__name__}.config must declare method: Literal[{method.name!r}]")
    if method.name in MIXTURE_METHODS and type(MIXTURE_METHODS[method.name]) is not method:
        raise ValueError(f"mixture method {method.name!r} is already registered")
    MIXTURE_METHODS[method.name] = method()
    return method

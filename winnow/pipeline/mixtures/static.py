"""Static mixtures: uniform, proportional to the domains' token counts, and temperature-scaled counts
(:func:`winnow.selectors.mixture.static_weights`); no proxy is trained."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from winnow.pipeline.mixtures.base import MixtureCommon, MixtureMethod, MixtureRun, register


class UniformConfig(MixtureCommon):
    method: Literal["uniform"]


class ProportionalConfig(MixtureCommon):
    method: Literal["proportional"]


class TemperatureConfig(MixtureCommon):
    method: Literal["temperature"]
    temperature: float = Field(default=2.0, gt=0, description="temperature: weights ∝ tokens^(1/temperature)")


class _Static(MixtureMethod):
    def static_weights(self, run: MixtureRun) -> np.ndarray:
        from winnow.selectors.mixture import static_weights

        return static_weights(run.tokens, self.name, getattr(run.config, "temperature", 1.0)).numpy()


@register
class Uniform(_Static):
    name = "uniform"
    config = UniformConfig


@register
class Proportional(_Static):
    name = "proportional"
    config = ProportionalConfig


@register
class Temperature(_Static):
    name = "temperature"
    config = TemperatureConfig

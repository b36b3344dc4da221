"""The base of every recipe section's pydantic model (`winnow.pipeline.recipe` and the registered choices'
own option models): unknown keys are refused, assignments are validated."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Device = Literal["auto", "cpu", "cuda"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)

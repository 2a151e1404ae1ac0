"""The base every config section derives from: unknown keys refused, values frozen once validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

SIZES_IN_EIGHTS = "Stable Diffusion pipelines take image sizes in steps of 8"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

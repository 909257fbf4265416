"""The base of every section model, and the constrained number types the sections share."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, no silent coercion of types, and a
    number is finite (`.inf` and `.nan` are refused by every float field)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=True,
                              allow_inf_nan=False)

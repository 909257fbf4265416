"""The base of every section model, and the constrained number types the sections share."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from spec.errors import Refusal
from spec.secrets import credential, mask, url_password

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
# A seed every consumer takes: numpy's generators refuse negatives, torch's more than 64 bits.
Seed = Annotated[int, Field(ge=0, lt=2**63)]

# Where a credential goes instead of the spec: a variable read when a job starts.
PASSTHROUGH_HINT = (
    "keep it out of the spec: export it in the environment that submits the run and list "
    "its variable's name in cluster.env_passthrough (the value is read when a job starts "
    "and never written)"
)


def no_secret(value: str, hint: str = PASSTHROUGH_HINT) -> str:
    """Refuse a string that holds a credential or a URL with a password (`spec.secrets`):
    every string of a spec is written into the bundle. The value is shown masked."""
    if (what := credential(value)) is not None:
        raise Refusal(f"{mask(value)!r} looks like {what}; every value of a spec is written "
                      "into the bundle's files", hint)
    if url_password(value):
        raise Refusal(f"{mask(value)!r} holds a URL with a password (user:password@); every "
                      "value of a spec is written into the bundle's files", hint)
    return value


class Section(BaseModel):
    """Base of every section: unknown keys are errors, no silent coercion of types, a number
    is finite (`.inf` and `.nan` are refused by every float field), and no secrets (a
    credential-looking string, or a URL with a password, in any field)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=True,
                              allow_inf_nan=False)
    # The hint of a refused secret, by field name, where a field knows a better one.
    secret_hints: ClassVar[dict[str, str]] = {}

    @field_validator("*")
    @classmethod
    def _no_secret_values(cls, v: Any, info: ValidationInfo) -> Any:
        hint = cls.secret_hints.get(info.field_name or "", PASSTHROUGH_HINT)
        if isinstance(v, str):
            no_secret(v, hint)
        elif isinstance(v, list | tuple):
            for i, item in enumerate(v):
                if isinstance(item, str):
                    try:
                        no_secret(item, hint)
                    except Refusal as err:
                        raise Refusal(f"item {i}: {err}", err.hint) from None
        return v

"""What can still be checked in a spec that did not validate: a best-effort `Spec`.

pydantic stops at the first level that fails: a model whose fields did not all validate never
runs its model validators, and without a `Spec` the compiler's cross-section checks cannot run
either, so a user would fix a file in rounds (shape errors, then a section's rule, then the
compiler's checks). `partial_spec` builds, from the data and pydantic's errors, a `Spec` in
which every value that validated is the value `Spec.model_validate` gives it and every value
that did not is an `Invalid` stand-in: any use of it (arithmetic, comparison, formatting,
attribute access, truth) raises `InvalidValueUsed`. It then runs the model validators that
pydantic skipped; a validator that touches an invalid value says nothing.

The compiler (`compiler.api`) runs its checks on that spec the same way: a rule that uses an
invalid value is skipped, one that does not reports what it finds.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from spec.errors import KeyPath, Problem
from spec.models import Spec
from spec.walk import is_model, union_members, union_tags, unwrap, walk


class InvalidValueUsed(Exception):
    """A check used a value of the spec that did not validate (reported already)."""


def _refuse(self: Invalid, *_: Any, **__: Any) -> Any:
    raise InvalidValueUsed(object.__getattribute__(self, "path"))


class Invalid:
    """Stands in for a value that did not validate; every use of it raises InvalidValueUsed."""

    __slots__ = ("path",)

    def __init__(self, path: KeyPath):
        object.__setattr__(self, "path", path)

    def __repr__(self) -> str:
        return f"<invalid {object.__getattribute__(self, 'path')!r}>"

    __getattr__ = __setattr__ = __call__ = _refuse
    __bool__ = __int__ = __float__ = __index__ = __str__ = __format__ = __hash__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse  # type: ignore[assignment]
    __iter__ = __len__ = __contains__ = __getitem__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = _refuse
    __mod__ = __rmod__ = __pow__ = __rpow__ = __divmod__ = __rdivmod__ = _refuse
    __neg__ = __pos__ = __abs__ = __round__ = __trunc__ = __floor__ = __ceil__ = _refuse
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = _refuse


class _Errors:
    """pydantic's errors as paths of the document."""

    def __init__(self, error: ValidationError, raw: Any):
        self.fields: set[KeyPath] = set()  # a value there did not validate (or is missing)
        self.models: set[KeyPath] = set()  # a model there ran its validators, which failed
        self.under: set[KeyPath] = set()  # every prefix of a path that has an error
        for err in error.errors(include_url=False):
            path, tp, _, _ = walk(tuple(err["loc"]), raw)
            if err["type"] in ("value_error", "assertion_error") and is_model(unwrap(tp)):
                self.models.add(path)
            elif err["type"] != "extra_forbidden":  # an unknown key is no field: it is left out
                self.fields.add(path)
            self.under.update(path[:n] for n in range(len(path) + 1))


def _adapt(tp: Any, value: Any, path: KeyPath) -> Any:
    """A value pydantic accepted, converted as `Spec.model_validate` converts it."""
    try:
        return TypeAdapter(tp).validate_python(value)
    except (ValidationError, TypeError, ValueError):  # not reached for accepted values
        return Invalid(path)


def _value(tp: Any, data: Any, path: KeyPath, errors: _Errors, problems: list[Problem]) -> Any:
    if path in errors.fields:
        return Invalid(path)
    if path not in errors.under:
        return _adapt(tp, data, path)
    model = unwrap(tp)
    if not is_model(model) and isinstance(data, Mapping):
        model = union_tags(union_members(tp)).get(data.get("type"))  # a stage of a tagged union
    if is_model(model) and isinstance(data, Mapping):
        return _model(model, data, path, errors, problems)
    if typing.get_origin(model) is list and isinstance(data, list):
        item = typing.get_args(model)[0]
        return [_value(item, d, (*path, i), errors, problems) for i, d in enumerate(data)]
    return Invalid(path)


def _model(cls: type[BaseModel], data: Mapping[str, Any], path: KeyPath, errors: _Errors,
           problems: list[Problem]) -> BaseModel:
    values: dict[str, Any] = {}
    for name, f in cls.model_fields.items():
        at = (*path, name)
        if name in data:
            values[name] = _value(f.annotation, data[name], at, errors, problems)
        elif at in errors.fields:
            values[name] = Invalid(at)  # required and missing
        else:
            values[name] = f.get_default(call_default_factory=True)
    instance = cls.model_construct(**values)
    if path not in errors.models:  # pydantic skipped this model's validators: run them now
        for decorator in cls.__pydantic_decorators__.model_validators.values():
            if decorator.info.mode != "after":
                continue
            try:
                decorator.func(instance)
            except (ValueError, AssertionError) as exc:
                problems.append(Problem(path, str(exc), getattr(exc, "hint", None)))
            except Exception:  # it used an invalid value: nothing to say
                continue
    return instance


def partial_spec(error: ValidationError, raw: Mapping[str, Any]) -> tuple[Any, list[Problem]]:
    """(best-effort Spec, unlocated problems of the model validators pydantic skipped)."""
    problems: list[Problem] = []
    spec = _model(Spec, raw, (), _Errors(error, raw), problems)
    return spec, list(dict.fromkeys(problems))

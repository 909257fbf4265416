"""The models' types along a path of the document: what a pydantic error's `loc` points at.

pydantic's `loc` names fields, list indices and the tags of unions; `walk` turns it into the
path as the user wrote it, with the annotation found there, so that an error can be worded
(`spec.pydantic_errors`) and the values that did validate kept (`spec.partial`).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

from spec.errors import KeyPath, PathPart
from spec.models import Spec


def unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional: `PosInt | None` → int, `MoE | None` → MoE."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def union_members(tp: Any) -> list[Any]:
    tp = unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return []


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def union_tags(members: list[Any]) -> dict[str, type[BaseModel]]:
    """Discriminator values ('type: ...') of the models of a tagged union, in declared order."""
    out: dict[str, type[BaseModel]] = {}
    for m in members:
        if is_model(m) and "type" in m.model_fields:
            for tag in typing.get_args(unwrap(m.model_fields["type"].annotation)):
                out[tag] = m
    return out


def child(tp: Any, part: PathPart) -> Any:
    """The annotation one step down `part` from `tp`, or None when unknown."""
    tp = unwrap(tp)
    if is_model(tp):
        f = tp.model_fields.get(part) if isinstance(part, str) else None
        return f.annotation if f is not None else None
    origin = typing.get_origin(tp)
    if origin is list and isinstance(part, int):
        return typing.get_args(tp)[0]
    if origin is dict and isinstance(part, str):
        return typing.get_args(tp)[1]
    return None


def walk(loc: tuple, raw: Any) -> tuple[KeyPath, Any, Any, Any]:
    """pydantic's loc → (path as written, annotation there, parent annotation, value there).

    pydantic inserts union tags into loc ('flat_groups', 'function-after[...]'); they name no
    key of the document, so they are dropped, and the walk continues into the tagged model.
    """
    tp: Any = Spec
    parent: Any = None
    data: Any = raw
    path: list[PathPart] = []
    for part in loc:
        members = union_members(tp)
        if members and isinstance(part, str):
            tagged = union_tags(members)
            by_name = {m.__name__: m for m in members if isinstance(m, type)}
            if part in tagged or part in by_name:
                tp = tagged.get(part) or by_name[part]
                continue
            if not (isinstance(data, dict) and part in data):
                continue  # another pydantic tag, e.g. 'function-after[_check(), int]'
        path.append(part)
        parent, tp = tp, child(tp, part)
        if isinstance(data, dict) and isinstance(part, str):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and -len(data) <= part < len(data):
            data = data[part]
        else:
            data = None
    # A single tagged model at the end (a model validator's error) resolves through its tag.
    members = union_members(tp)
    if members and isinstance(data, dict) and isinstance(data.get("type"), str):
        tp = union_tags(members).get(data["type"], tp)
    return tuple(path), tp, parent, data

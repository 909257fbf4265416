"""Generate docs/spec.md, the reference of every key, from the pydantic models.

`python -m spec.docs` prints it (`make docs` writes docs/spec.md); a test fails when the
committed file is stale. One table per section, in the order a spec is written (the models'
declaration order, depth first), then the filter stage variants; nothing depends on dict or
set ordering, so the output is byte-stable.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from spec.models import Spec

_HEADER = """\
# Spec reference

<!-- Generated from spec/models/ by `make docs` (python -m spec.docs). Do not edit by hand. -->

A spec is one YAML file describing one RL run. Every key is checked before anything runs:
an unknown key is an error (with a did-you-mean), types are strict (`'8'` is not an
integer, `8.0` is not an integer), and all problems of a file are reported together, each
with its dotted path and line. Any key can be overridden on the command line with
`--set path=value`, e.g. `--set train.steps=100`, `--set filters[1].action=drop` (or
`filters.1.action`); the value is YAML under the rules below.

## YAML rules

- Only `true` and `false` are booleans. `yes`, `no`, `on`, `off` are strings, so
  `router_replay: {mode: off}` means the mode `"off"`.
- `1e-6`, `1.5e-4` and `3E-4` are numbers (YAML 1.1 would read them as strings);
  `1_000_000` is an integer; `.inf` and `.nan` are refused (every number must be finite).
- `24:00:00` and `2024-01-01` are strings (no base-60 numbers, no dates).
- One document per file; keys are strings and appear once per mapping.
- Anchors, aliases and merge keys (`<<: *defaults`) work; a document may expand to at most
  100,000 values.
- Quote a string that would otherwise read as a number, boolean or null: `name: '2024'`.
- Your own files (`model.checkpoint`, `model.tokenizer`, `data.train`, `data.eval`, a screen's
  `proxy_model`) may be given relative to the spec's folder, or from `~`: the bundle holds
  them as absolute paths. On `cluster.scheduler: local`, validate checks that they exist.
"""

_BOUND_WORDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def _anchor(path: str) -> str:
    return path.replace("[]", "").replace(".", "-")


def _link(path: str) -> str:
    return f"[`{path}`](#{_anchor(path)})"


def _value(v: Any) -> str:
    """A default as it would be written in YAML."""
    if isinstance(v, BaseModel):
        return "`{}`"
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, float):
        text = repr(v)
        if "e" in text:  # 1e-06 → 1e-6, as one writes it
            mantissa, exp = text.split("e")
            text = f"{mantissa}e{int(exp)}"
        return f"`{text}`"
    if isinstance(v, str):
        return f"`{v}`" if v else '`""`'
    return f"`{json.dumps(v, ensure_ascii=False)}`"


def _constraints(meta: list[Any], sep: str = "") -> str:
    bounds = {}
    words = []
    for m in meta:
        for attr in ("gt", "ge", "lt", "le"):
            if getattr(m, attr, None) is not None:
                bounds[attr] = getattr(m, attr)
        if getattr(m, "min_length", None) is not None:
            words.append(f"at least {m.min_length} item{'s' if m.min_length != 1 else ''}")
        if getattr(m, "pattern", None) is not None:
            words.append(f"matching `{m.pattern}`")
    lo = next(((a, bounds[a]) for a in ("gt", "ge") if a in bounds), None)
    hi = next(((a, bounds[a]) for a in ("lt", "le") if a in bounds), None)
    if lo and hi:
        words.insert(0, f"in {'(' if lo[0] == 'gt' else '['}{lo[1]}, {hi[1]}"
                        f"{')' if hi[0] == 'lt' else ']'}")
    elif lo or hi:
        a, b = lo or hi  # type: ignore[misc]
        words.insert(0, f"{_BOUND_WORDS[a]} {b}")
    return sep + " " + ", ".join(words) if words else ""


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return []


def _type(tp: Any, meta: list[Any], path: str) -> str:
    """A field's type in words, with its bounds; sections link to their table."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *extra = typing.get_args(tp)
        inner = [m for e in extra for m in (e.metadata if isinstance(e, FieldInfo) else [e])]
        return _type(base, meta + inner, path)
    if members := _members(tp):
        rest = [m for m in members if m is not type(None)]
        if len(rest) < len(members):
            text = " or ".join(_type(m, meta, path) for m in rest)
            return f"{text} or `null`"
        if all(_is_model(m) for m in rest):
            return "[filter stage](#filter-stages)"
    if typing.get_origin(tp) is Literal:
        values = typing.get_args(tp)
        return ("one of " if len(values) > 1 else "") + ", ".join(_value(a) for a in values)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return f"list of {_type(item, [], path + '[]')}{_constraints(meta, ',')}"
    if typing.get_origin(tp) is dict:
        key, val = typing.get_args(tp)
        return f"mapping of {_type(key, [], path)} to {_type(val, [], path)}"
    if _is_model(tp):
        return f"section {_link(path)}"
    names = {int: "integer", float: "number", str: "string", bool: "boolean"}
    return names.get(tp, getattr(tp, "__name__", str(tp))) + _constraints(meta)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(model: type[BaseModel], path: str, stage: bool = False) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        child = f"{path}.{name}" if path else name
        kind = _type(f.annotation, list(f.metadata), child)
        if f.is_required():
            default = "**required**"
        else:
            default = _value(f.get_default(call_default_factory=True))
        desc = f.description or _doc(_section_model(f.annotation))
        if not desc and stage and name == "type":
            desc = "Selects this stage."
        rows.append(f"| `{name}` | {_cell(kind)} | {_cell(default)} | {_cell(desc)} |")
    return rows


def _doc(model: type[BaseModel] | None) -> str:
    return " ".join((model.__doc__ or "").split()) if model is not None else ""


def _section_model(tp: Any) -> type[BaseModel] | None:
    """The model a field holds (through Optional and list), if it holds one section."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if members := [m for m in _members(tp) if m is not type(None)]:
        tp = members[0] if len(members) == 1 else None
    if typing.get_origin(tp) is list:
        return _section_model(typing.get_args(tp)[0])
    return tp if _is_model(tp) else None


def _stages(tp: Any) -> list[type[BaseModel]]:
    """The variants of a tagged union field (the filter stages), in declared order."""
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    members = _members(tp)
    return members if len(members) > 1 and all(_is_model(m) for m in members) else []


def _sections(
    model: type[BaseModel], path: str, out: list[str], level: int = 2,
    title: str | None = None, anchor: str | None = None, stage: bool = False,
) -> None:
    """Depth first: the model's table, then each section it holds, in declaration order."""
    title = title or (f"`{path}`" if path else "Top level")
    out += ["", f'<a id="{anchor or _anchor(path) or "top-level"}"></a>', "",
            f"{'#' * level} {title}", "", _doc(model), "", *_table(model, path, stage)]
    for name, f in model.model_fields.items():
        child = f"{path}.{name}" if path else name
        if stages := _stages(f.annotation):
            tags = [typing.get_args(s.model_fields["type"].annotation)[0] for s in stages]
            out += ["", '<a id="filter-stages"></a>', "",
                    f"{'#' * level} `{child}[]`: filter stages", "",
                    f"Each item of `{child}` is one stage, chosen by its `type`: "
                    + ", ".join(f"[`{t}`](#{_anchor(child)}-{t})" for t in tags) + "."]
            for stage, tag in zip(stages, tags, strict=True):
                _sections(stage, f"{child}[]", out, level + 1,
                          title=f"`{child}[]` with `type: {tag}`", anchor=f"{_anchor(child)}-{tag}",
                          stage=True)
            continue
        sub = _section_model(f.annotation)
        if sub is not None:
            suffix = "[]" if typing.get_origin(_strip(f.annotation)) is list else ""
            _sections(sub, child + suffix, out, level)


def _strip(tp: Any) -> Any:
    members = [m for m in _members(tp) if m is not type(None)]
    return members[0] if len(members) == 1 else tp


def render_docs() -> str:
    """docs/spec.md: the header, the YAML rules, and one table per section."""
    out = [_HEADER.rstrip("\n")]
    _sections(Spec, "", out)
    return "\n".join(out) + "\n"


def main() -> None:
    print(render_docs(), end="")


if __name__ == "__main__":
    main()

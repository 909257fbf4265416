"""Load a spec file: YAML with line numbers, then strict validation, all problems at once.

Three pure steps the compiler can reuse: `load_data` (text → plain data + the line of every
key and list item), `validate` (data → `Spec`, pydantic errors turned into located `Problem`s),
and `load_spec` (file + `--set` overrides → `SpecSource`).

YAML rules of a spec (a subset of YAML 1.2's core schema, chosen so that nothing surprises):
- only `true` / `false` are booleans: `mode: off`, `yes`, `no`, `on` stay strings;
- `1e-6`, `1.5e-4`, `3E-4` are floats (YAML 1.1 reads them as strings), `1_000` is an int;
- `24:00:00` and `2024-01-01` stay strings (no sexagesimal numbers, no timestamps);
- one document per file, string keys only, no duplicate keys, no tags beyond the core ones;
- anchors, aliases and merge keys (`<<: *defaults`) work, up to `NODE_BUDGET` values in all;
- a file over `MAX_BYTES` (1 MiB; a spec is a few KB) is refused before it is parsed.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from spec.errors import PathPart, Problem, SpecError, dotted
from spec.models import Spec

KeyPath = tuple[PathPart, ...]
Locations = dict[KeyPath, int]

# Real specs are a few KB. Larger input is refused before the (pure-Python) parser reads it:
# a 10 MB file would take a minute and over half a GB to parse.
MAX_BYTES = 1 << 20
# Values (mapping values and list items) a document may hold: counted once per node while
# parsing, and again while building the data, where an alias counts each time it is used
# (a billion-laughs document is tiny text whose aliases multiply into billions of values).
NODE_BUDGET = 100_000
MAX_DEPTH = 64
OVERRIDE_FILE = "--set"

_CORE = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_CORE + t for t in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ, _MERGE = _CORE + "map", _CORE + "seq", _CORE + "merge"

_DIGITS = r"[0-9]+(?:_[0-9]+)*"
_NULL_RE = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(rf"^[-+]?(?:{_DIGITS}|0o[0-7]+|0x[0-9a-fA-F]+)$")
# Unlike YAML 1.1, the dot is optional: `1e-6` is a float.
_FLOAT_RE = re.compile(
    rf"^[-+]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?[0-9]+)?$"
)
_INF_RE = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN_RE = re.compile(r"^\.(?:nan|NaN|NAN)$")

_START_HINT = (
    "a spec is a YAML mapping of sections; it needs at least: "
    + ", ".join(n for n, f in Spec.model_fields.items() if f.is_required())
)


def _resolve_plain(value: str) -> str:
    """Tag of an unquoted scalar under the spec's rules (see the module docstring)."""
    if value == "<<":
        return _MERGE
    if _NULL_RE.match(value):
        return _NULL
    if _BOOL_RE.match(value):
        return _BOOL
    if _INT_RE.match(value):
        return _INT
    if _FLOAT_RE.match(value) or _INF_RE.match(value) or _NAN_RE.match(value):
        return _FLOAT
    return _STR


class _TooManyValues(Exception):
    def __init__(self, line: int):
        self.line = line


class _Loader(yaml.SafeLoader):
    """Composes nodes only (the pure-Python parser: its messages name the bad character)."""

    values = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        # Keys are composed with index None; values, items and the root are counted.
        if (index is not None or parent is None) and not self.check_event(yaml.AliasEvent):
            self.values += 1
            if self.values > NODE_BUDGET:
                raise _TooManyValues(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:  # type: ignore[override]
        if kind is yaml.ScalarNode and implicit[0]:
            return _resolve_plain(value)
        return super().resolve(kind, value, implicit)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


def _scalar_value(tag: str, text: str) -> Any:
    """Construct a core-schema scalar; ValueError when the text does not fit its tag."""
    if tag == _STR:
        return text
    if tag == _NULL and _NULL_RE.match(text):
        return None
    if tag == _BOOL and _BOOL_RE.match(text):
        return text.lower() == "true"
    if tag == _INT and _INT_RE.match(text):
        digits = text.replace("_", "")
        sign = -1 if digits.startswith("-") else 1
        digits = digits.lstrip("+-")
        if digits.startswith(("0o", "0x")):
            return sign * int(digits[2:], 8 if digits[1] == "o" else 16)
        return sign * int(digits)
    if tag in (_FLOAT, _INT):
        if _INF_RE.match(text):
            return float("-inf") if text.startswith("-") else float("inf")
        if _NAN_RE.match(text):
            return float("nan")
        if _FLOAT_RE.match(text):
            return float(text.replace("_", ""))
    raise ValueError(f"{text!r} is not a valid {_short_tag(tag)}")


class _Fatal(Exception):
    """Stops building: the data cannot be trusted (budget, recursion)."""

    def __init__(self, problem: Problem):
        self.problem = problem


class _Builder:
    """Turns composed YAML nodes into plain data, recording the line of every key and item."""

    def __init__(self, file: str, budget: int):
        self.file = file
        self.budget = budget
        self.count = 0
        self.locations: Locations = {}
        self.problems: list[Problem] = []
        self._active: set[int] = set()

    def _problem(
        self, path: KeyPath, message: str, node: yaml.Node, hint: str | None = None
    ) -> None:
        self.problems.append(Problem(path, message, hint, file=self.file, line=_line(node)))

    def _tick(self, node: yaml.Node, path: KeyPath) -> None:
        self.count += 1
        if self.count > self.budget:
            top = path[:1]
            raise _Fatal(Problem(
                top,
                f"the document expands to more than {self.budget:,} values: aliases (*name) "
                "nested inside each other multiply (a 'billion laughs' document)",
                "use each alias for a small mapping or value only",
                file=self.file, line=self.locations.get(top, _line(node)),
            ))

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self._tick(node, path)
        if len(path) > MAX_DEPTH:
            raise _Fatal(Problem(path[:1], f"the document is nested more than {MAX_DEPTH} levels "
                                 "deep", file=self.file, line=_line(node)))
        if isinstance(node, yaml.ScalarNode):
            try:
                return _scalar_value(node.tag, node.value)
            except ValueError as exc:
                if node.tag in (_STR, _INT, _FLOAT, _BOOL, _NULL):
                    self._problem(path, str(exc), node)
                else:
                    self._problem(path, f"unsupported YAML tag {_short_tag(node.tag)}", node,
                                  "a spec uses plain strings, numbers, true/false, null, "
                                  "lists and mappings only")
                return node.value
        if id(node) in self._active:
            raise _Fatal(Problem(path, "an alias refers to a node that contains it "
                                 "(a recursive structure)", file=self.file, line=_line(node)))
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path)
            return self._mapping(node, path)
        finally:
            self._active.discard(id(node))

    def _sequence(self, node: yaml.SequenceNode, path: KeyPath) -> list:
        if node.tag != _SEQ:
            self._problem(path, f"unsupported YAML tag {_short_tag(node.tag)}", node)
        items = []
        for i, item in enumerate(node.value):
            self.locations[(*path, i)] = _line(item)
            items.append(self.build(item, (*path, i)))
        return items

    def _key(self, node: yaml.Node, path: KeyPath, report: bool = True) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            return node.value
        if report:
            if isinstance(node, yaml.ScalarNode):
                try:
                    shown = describe_value(_scalar_value(node.tag, node.value))
                except ValueError:
                    shown = f"tagged {_short_tag(node.tag)}"
                self._problem(path, f"key {node.value!r} is {shown}, not a string", node,
                              f"quote it: '{node.value}'")
            else:
                kind = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
                self._problem(path, f"a key must be a string, not {kind}", node)
        return None

    def _merged(self, node: yaml.Node, path: KeyPath, chain: frozenset[int]) -> list:
        """(key, key node, value node) of the mappings a `<<` merges, earlier ones first."""
        self._tick(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [pair for item in node.value for pair in self._merged(item, path, chain)]
        if not isinstance(node, yaml.MappingNode):
            self._problem(path, "'<<' merges a mapping or a list of mappings, not a value", node)
            return []
        if id(node) in chain:
            raise _Fatal(Problem(path, "a merge key ('<<') merges a mapping into itself",
                                 file=self.file, line=_line(node)))
        own, nested = [], []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                nested += self._merged(value_node, path, chain | {id(node)})
            elif (key := self._key(key_node, path, report=False)) is not None:
                own.append((key, key_node, value_node))
        return own + nested

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict:
        if node.tag != _MAP:
            self._problem(path, f"unsupported YAML tag {_short_tag(node.tag)}", node)
        out: dict[str, Any] = {}
        first: dict[str, int] = {}
        merged: list = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merged += self._merged(value_node, path, frozenset({id(node)}))
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            line = _line(key_node)
            if key in first:
                self.problems.append(Problem(
                    (*path, key), f"duplicate key '{key}' (first at line {first[key]}, "
                    f"again at line {line})", "keep one of them: YAML would silently drop the "
                    "first", file=self.file, line=line))
                continue
            first[key] = line
            self.locations[(*path, key)] = line
            out[key] = self.build(value_node, (*path, key))
        # Keys written in the mapping win over merged ones; among merges the first wins.
        for key, key_node, value_node in merged:
            if key not in out:
                self.locations[(*path, key)] = _line(key_node)
                out[key] = self.build(value_node, (*path, key))
        return out


def _yaml_problem(exc: yaml.YAMLError, text: str, file: str) -> Problem:
    """One problem, with line and column, for anything the YAML parser rejects."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        return Problem((), f"invalid character #x{exc.character:04x} in the file: {exc.reason}",
                       "a spec is plain UTF-8 text", file=file, line=line)
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return Problem((), f"invalid YAML: {exc}", file=file, line=None)
    mark = exc.problem_mark
    line, column = mark.line + 1, mark.column + 1
    if exc.context == "expected a single document in the stream":
        return Problem((), "the file holds more than one YAML document; a spec is one document",
                       f"remove the '---' at line {line}, or split the file", file=file, line=line)
    problem = exc.problem or "malformed YAML"
    hint = None
    if exc.context and exc.context_mark is not None and exc.context_mark.line != mark.line:
        hint = f"{exc.context} that starts at line {exc.context_mark.line + 1}"
    this_line = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
    if "\t" in problem or (problem.startswith("found character") and "\t" in this_line):
        hint = "indent with spaces: YAML does not allow tabs"
    elif "mapping values are not allowed" in problem:
        hint = "check the indentation of this line; a value that contains ': ' must be quoted"
    elif "undefined alias" in problem:
        hint = "define the anchor (&name) before an alias (*name) uses it"
    elif "<stream end>" in problem or "end of stream" in problem:
        hint = "the file ends inside an unclosed bracket or quote" + (f" ({hint})" if hint else "")
    return Problem((), f"invalid YAML at column {column}: {problem}", hint, file=file, line=line)


_SIZE_HINT = ("a spec is a few KB of YAML: is this the right file? Prompts go in a JSONL file "
              "that data.train names")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n:,} bytes)" if n >= 2**20 else f"{n:,} bytes"


def _too_big(size: int, file: str) -> SpecError:
    return SpecError([Problem(
        (), f"the file is {_size(size)}, over the {_size(MAX_BYTES)} limit of a spec file; "
        "it was not parsed", _SIZE_HINT, file=file, line=None)])


def _compose(text: str, file: str) -> yaml.Node | None:
    loader = None
    try:
        loader = _Loader(text)  # the reader already rejects control characters here
        return loader.get_single_node()
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_problem(exc, text, file)]) from None
    except RecursionError:
        raise SpecError([Problem((), "the document is nested too deeply to read", file=file,
                                 line=None)]) from None
    except _TooManyValues as exc:
        raise SpecError([Problem(
            (), f"the document holds more than {NODE_BUDGET:,} values; a spec has a few hundred",
            _SIZE_HINT, file=file, line=exc.line)]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _build(node: yaml.Node, file: str, path: KeyPath = ()) -> tuple[Any, Locations]:
    builder = _Builder(file, NODE_BUDGET)
    try:
        data = builder.build(node, path)
    except _Fatal as fatal:
        raise SpecError([fatal.problem]) from None
    if builder.problems:
        raise SpecError(_sorted(list(dict.fromkeys(builder.problems))))
    return data, builder.locations


def load_data(text: str, file: str) -> tuple[dict[str, Any], Locations]:
    """Parse a spec's YAML text into plain data and the 1-based line of every key and item.

    Raises SpecError for anything that is not one mapping with string keys, unique keys and
    a bounded size; its problems carry `file` and the line.
    """
    if len(text) > MAX_BYTES // 4 and (size := len(text.encode("utf-8"))) > MAX_BYTES:
        raise _too_big(size, file)
    if not text.strip():
        raise SpecError([Problem((), "the file is empty", _START_HINT, file=file, line=None)])
    node = _compose(text, file)
    if node is None:
        raise SpecError([Problem((), "the file has no content, only comments or blank lines",
                                 _START_HINT, file=file, line=None)])
    if not isinstance(node, yaml.MappingNode):
        if isinstance(node, yaml.SequenceNode):
            found = "a list"
        else:
            try:
                found = describe_value(_scalar_value(node.tag, node.value))
            except ValueError:
                found = f"a value tagged {_short_tag(node.tag)}"
        raise SpecError([Problem((), f"the top level of the file is {found}, not a mapping of "
                                 "sections", _START_HINT, file=file, line=_line(node))])
    data, locations = _build(node, file)
    return data, locations


def load_value(text: str, file: str = OVERRIDE_FILE) -> Any:
    """Parse one YAML value (an override's right-hand side) under the same rules as a file."""
    node = _compose(text, file)
    if node is None:
        return None
    return _build(node, file)[0]


# --------------------------------------------------------------------------- pydantic errors


def describe_value(value: Any) -> str:
    """A value as a person reads it: "the string '8'", "the integer 8", "a list"."""
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _unwrap(tp: Any) -> Any:
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


def _union_members(tp: Any) -> list[Any]:
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tags(members: list[Any]) -> dict[str, type[BaseModel]]:
    """Discriminator values ('type: ...') of the models of a tagged union, in declared order."""
    out: dict[str, type[BaseModel]] = {}
    for m in members:
        if _is_model(m) and "type" in m.model_fields:
            for tag in typing.get_args(_unwrap(m.model_fields["type"].annotation)):
                out[tag] = m
    return out


def _child(tp: Any, part: PathPart) -> Any:
    """The annotation one step down `part` from `tp`, or None when unknown."""
    tp = _unwrap(tp)
    if _is_model(tp):
        f = tp.model_fields.get(part) if isinstance(part, str) else None
        return f.annotation if f is not None else None
    origin = typing.get_origin(tp)
    if origin is list and isinstance(part, int):
        return typing.get_args(tp)[0]
    if origin is dict and isinstance(part, str):
        return typing.get_args(tp)[1]
    return None


def _walk(loc: tuple, raw: Any) -> tuple[KeyPath, Any, Any, Any]:
    """pydantic's loc → (path as written, annotation there, parent annotation, value there).

    pydantic inserts union tags into loc ('flat_groups', 'function-after[...]'); they name no
    key of the document, so they are dropped, and the walk continues into the tagged model.
    """
    tp: Any = Spec
    parent: Any = None
    data: Any = raw
    path: list[PathPart] = []
    for part in loc:
        members = _union_members(tp)
        if members and isinstance(part, str):
            tagged = _tags(members)
            by_name = {m.__name__: m for m in members if isinstance(m, type)}
            if part in tagged or part in by_name:
                tp = tagged.get(part) or by_name[part]
                continue
            if not (isinstance(data, dict) and part in data):
                continue  # another pydantic tag, e.g. 'function-after[_check(), int]'
        path.append(part)
        parent, tp = tp, _child(tp, part)
        if isinstance(data, dict) and isinstance(part, str):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and -len(data) <= part < len(data):
            data = data[part]
        else:
            data = None
    # A single tagged model at the end (a model validator's error) resolves through its tag.
    members = _union_members(tp)
    if members and isinstance(data, dict) and isinstance(data.get("type"), str):
        tp = _tags(members).get(data["type"], tp)
    return tuple(path), tp, parent, data


def _did_you_mean(word: Any, choices: Sequence[str]) -> str | None:
    if not isinstance(word, str):
        return None
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == word.lower().strip()]
    return f"did you mean '{close[0]}'?" if close else None


def _homes(model: Any, key: str, prefix: KeyPath = (), depth: int = 4) -> list[KeyPath]:
    """Sections below `model` that have a field `key` (e.g. 'lr' → train.optimizer)."""
    found: list[KeyPath] = []
    model = _unwrap(model)
    members = _union_members(model) or [model]
    for m in members:
        m = _unwrap(m)
        if typing.get_origin(m) is list:
            found += _homes(typing.get_args(m)[0], key, (*prefix, 0), depth)
        elif _is_model(m) and depth >= 0:
            if key in m.model_fields and prefix:
                found.append(prefix)
            for name, f in m.model_fields.items():
                found += _homes(f.annotation, key, (*prefix, name), depth - 1)
    return list(dict.fromkeys(found))


def _unknown_key(path: KeyPath, parent: Any, value: Any) -> Problem:
    key = path[-1]
    model = _unwrap(parent)
    fields = list(model.model_fields) if _is_model(model) else []
    hint = _did_you_mean(key, fields)
    if hint is None and isinstance(key, str):
        # A key written in the wrong section: look below this one first, then everywhere.
        homes = [(*path[:-1], *h) for h in _homes(model, key)] or _homes(Spec, key)
        if homes:
            hint = f"'{key}' belongs under " + " or ".join(
                dotted(h).replace("[0]", "[]") for h in homes[:3])
    if hint is None and fields:
        hint = "valid keys here: " + ", ".join(fields)
    return Problem(path, f"unknown key '{key}'", hint)


def _allowed(tp: Any) -> list[Any]:
    tp = _unwrap(tp)
    return list(typing.get_args(tp)) if typing.get_origin(tp) is Literal else []


def _type_hint(expected: str, value: Any) -> str | None:
    """A fix for the usual type slips: quoted numbers, 8.0 for 8, yes/on for true."""
    if isinstance(value, str) and expected in ("integer", "number"):
        try:
            number = load_value(value)
        except SpecError:
            number = None
        fits = int if expected == "integer" else int | float
        if isinstance(number, fits) and not isinstance(number, bool):
            return f"remove the quotes: {value.strip()}"
    if isinstance(value, float) and expected == "integer" and value.is_integer():
        return f"write it as an integer: {int(value)}"
    if isinstance(value, str) and expected == "boolean":
        if value.lower() in ("yes", "on", "y", "true"):
            return "write true: only true and false are booleans in a spec (not yes/no/on/off)"
        if value.lower() in ("no", "off", "n", "false"):
            return "write false: only true and false are booleans in a spec (not yes/no/on/off)"
    if expected == "string" and isinstance(value, int | float | bool):
        text = str(value).lower() if isinstance(value, bool) else repr(value)
        return f"quote it: '{text}'"
    if expected == "list" and isinstance(value, str | int | float):
        return f"write a list, e.g. [{value}]"
    return None


_TYPE_WORDS = {
    "int_type": "integer", "int_parsing": "integer", "float_type": "number",
    "float_parsing": "number", "bool_type": "boolean", "bool_parsing": "boolean",
    "string_type": "string", "list_type": "list", "dict_type": "mapping",
    "model_type": "mapping", "model_attributes_type": "mapping", "tuple_type": "list",
    "none_required": "null",
}
_BOUNDS = {
    "greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "at least"),
    "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most"),
}


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # pydantic turns the bound 0 of a float field into 0.0
    return str(value).lower() if isinstance(value, bool) else str(value)


def _problem_from(err: Mapping[str, Any], raw: Any) -> Problem:
    """One pydantic error → a Problem in a person's words (unlocated)."""
    kind: str = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    path, tp, parent, _ = _walk(tuple(err["loc"]), raw)
    name = path[-1] if path else None

    if kind == "extra_forbidden":
        return _unknown_key(path, parent, value)
    if kind == "missing":
        f = _unwrap(parent).model_fields.get(name) if _is_model(_unwrap(parent)) else None
        what = "section" if f is not None and _is_model(_unwrap(f.annotation)) else "key"
        about = f.description if f is not None else None
        if not about and what == "section":
            about = " ".join((_unwrap(f.annotation).__doc__ or "").split())
        hint = f"{name}: {about}" if about else None
        return Problem(path, f"missing required {what} '{name}'", hint)
    if kind == "literal_error":
        allowed = _allowed(tp)
        if not allowed:  # fall back to pydantic's own list
            allowed = [a.strip(" '") for a in re.split(r", | or ", ctx.get("expected", ""))]
        listing = ", ".join(str(a) for a in allowed)
        hint = _did_you_mean(value, [str(a) for a in allowed])
        hint = f"{hint} allowed: {listing}" if hint else f"allowed: {listing}"
        if isinstance(value, str):
            return Problem(path, f"'{value}' is not an allowed value", hint)
        return Problem(path, f"expected one of {listing}, got {describe_value(value)}", hint)
    if kind in ("union_tag_invalid", "union_tag_not_found", "model_attributes_type") and (
        tags := _tags(_union_members(tp))
    ):
        listing = ", ".join(tags)
        if kind == "union_tag_invalid":
            tag = ctx.get("tag")
            hint = _did_you_mean(tag, list(tags))
            return Problem((*path, "type"), f"unknown stage type '{tag}'",
                           f"{hint} stage types: {listing}" if hint else f"stage types: {listing}")
        if kind == "union_tag_not_found" and isinstance(value, dict):
            # Guess the stage from the keys given, e.g. {action: drop} → flat_groups.
            scores = {t: len(set(value) & set(m.model_fields)) for t, m in tags.items()}
            best = max(scores.values(), default=0)
            guesses = [t for t, s in scores.items() if s == best]
            hint = f"add 'type: {guesses[0]}'?" if best and len(guesses) == 1 else None
            hint = f"{hint} stage types: {listing}" if hint else f"stage types: {listing}"
            return Problem(path, "a stage needs a 'type' key", hint)
        known = isinstance(value, str) and value in tags
        hint = f"write it as '- type: {value}'" if known else f"stage types: {listing}"
        return Problem(path, f"expected a stage (a mapping with a 'type' key), got "
                       f"{describe_value(value)}", hint)
    if kind in _TYPE_WORDS:
        expected = _TYPE_WORDS[kind]
        model = _unwrap(tp)
        if kind == "model_type" and _is_model(model):
            expected = f"a mapping (the {name} section)" if isinstance(name, str) else "a mapping"
        elif expected not in ("null",):
            expected = ("an " if expected[0] in "aeiou" else "a ") + expected
        hint = _type_hint(_TYPE_WORDS[kind], value)
        if value is None and kind == "model_type" and _is_model(_unwrap(parent)):
            f = _unwrap(parent).model_fields.get(name)
            if f is not None and not f.is_required():
                hint = "remove the key to use the defaults, or give its keys"
        return Problem(path, f"expected {expected}, got {describe_value(value)}", hint)
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return Problem(path, f"must be {words} {_number(ctx.get(key))}, got {value!r}")
    if kind in ("too_short", "too_long"):
        n = ctx.get("min_length" if kind == "too_short" else "max_length")
        words = "at least" if kind == "too_short" else "at most"
        got = ctx.get("actual_length", len(value) if isinstance(value, list) else "?")
        return Problem(path, f"needs {words} {n} item{'s' if n != 1 else ''}, got {got}")
    if kind == "string_pattern_mismatch":
        f = _unwrap(parent).model_fields.get(name) if _is_model(_unwrap(parent)) else None
        hint = f.description if f is not None else None
        return Problem(path, f"{value!r} does not match the pattern {ctx.get('pattern')}", hint)
    if kind in ("value_error", "assertion_error"):
        error = ctx.get("error")
        text = str(error) if error is not None else err["msg"].removeprefix("Value error, ")
        return Problem(path, text)
    if kind == "invalid_key":
        return Problem(path[:-1], f"key {value!r} is {describe_value(value)}, not a string",
                       f"quote it: '{value}'")
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else kind
    return Problem(path, f"{msg.replace('Input should', 'should').replace('input', 'value')} "
                   f"(got {describe_value(value)})")


def problems_from_validation(error: ValidationError, raw: Any) -> list[Problem]:
    """Every error of a pydantic ValidationError of `Spec`, as unlocated Problems."""
    return list(dict.fromkeys(_problem_from(e, raw) for e in error.errors(include_url=False)))


# --------------------------------------------------------------------------- locating


def _prefixes(path: KeyPath) -> list[KeyPath]:
    return [path[:n] for n in range(len(path), 0, -1)]


def locate(
    problem: Problem,
    file: str,
    locations: Mapping[KeyPath, int],
    overridden: Mapping[KeyPath, str] | None = None,
) -> Problem:
    """Fill file and line from the longest prefix of the problem's path that has a location.

    A path set (or created) by `--set` is shown as file "--set" with the override's text; a
    problem above an overridden path keeps its line and names the override it came after.
    """
    overridden = overridden or {}
    for prefix in _prefixes(problem.path):
        if prefix in overridden:
            return replace(problem, file=OVERRIDE_FILE, line=None,
                           message=f"{problem.message} (from --set {overridden[prefix]})")
        if prefix in locations:
            below = [t for p, t in overridden.items() if p[: len(problem.path)] == problem.path]
            message = problem.message
            if below:
                message += " (after --set " + ", --set ".join(dict.fromkeys(below)) + ")"
            return replace(problem, file=file, line=locations[prefix], message=message)
    return replace(problem, file=file, line=problem.line)


def _sorted(problems: list[Problem]) -> list[Problem]:
    """File order: by line, problems without a line (and --set ones) last."""
    return sorted(problems, key=lambda p: (p.file == OVERRIDE_FILE, p.line is None, p.line or 0))


def validate(
    raw: Mapping[str, Any],
    locations: Mapping[KeyPath, int],
    file: str,
    overridden: Mapping[KeyPath, str] | None = None,
) -> Spec:
    """Validate plain data into a `Spec`; SpecError with every problem, located, otherwise.

    The error's `partial` is a SpecSource of what did validate (`spec.partial`), on which the
    model validators pydantic skipped have run: their problems are among the error's.
    """
    from spec.partial import partial_spec

    try:
        return Spec.model_validate(raw)
    except ValidationError as err:
        problems = problems_from_validation(err, raw)
        spec, skipped = partial_spec(err, raw)
        problems = [locate(p, file, locations, overridden)
                    for p in dict.fromkeys(problems + skipped)]
        partial = SpecSource(file, dict(raw), dict(locations), spec, dict(overridden or {}))
        raise SpecError(_sorted(problems), partial) from None


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class SpecSource:
    """A validated spec with where each of its keys was written."""

    file: str
    raw: dict[str, Any]  # the data after overrides
    locations: dict[KeyPath, int]
    spec: Spec
    # Paths set or created by `--set`, with the override's text.
    overridden: dict[KeyPath, str] = field(default_factory=dict)

    def locate(self, problem: Problem) -> Problem:
        """Fill the file and line of a problem found later (e.g. by the compiler's checks)."""
        return locate(problem, self.file, self.locations, self.overridden)


def _nearby(path: Path) -> str | None:
    """A did-you-mean for a missing file, from the spec files beside it."""
    try:
        names = [p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")]
    except OSError:
        return None
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"did you mean {path.parent / close[0]}?" if close else None


def read_text(path: str | Path) -> str:
    """A spec file's text; SpecError (one clear problem) when it cannot be read."""
    p = Path(path)
    file = str(path)
    if not p.exists():
        hint = _nearby(p) or "check the path"
        raise SpecError([Problem((), "file not found", hint, file=file)])
    if p.is_dir():
        specs = sorted(str(q) for q in p.iterdir() if q.suffix in (".yaml", ".yml"))[:5]
        hint = ("give the spec file: " + ", ".join(specs)) if specs else "give a .yaml file"
        raise SpecError([Problem((), "is a directory, not a spec file", hint, file=file)])
    try:
        if (size := p.stat().st_size) > MAX_BYTES:  # refused unread
            raise _too_big(size, file)
        data = p.read_bytes()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise SpecError([Problem((), f"cannot read the file: {reason}", file=file)]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SpecError([Problem((), f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x})",
                                 "save the spec as UTF-8", file=file, line=line)]) from None


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SpecSource:
    """Read, apply `--set` overrides, validate. SpecError lists every problem of the file."""
    # Imported here: overrides parses its values with this module's YAML rules.
    from spec.overrides import apply_overrides_tracked

    if isinstance(overrides, str):  # one override passed bare, not a list of characters
        overrides = [overrides]
    file = str(path)
    raw, locations = load_data(read_text(path), file)
    problems: list[Problem] = []
    overridden: dict[KeyPath, str] = {}
    if overrides:
        raw, problems, overridden = apply_overrides_tracked(raw, overrides)
        # Lines of the file no longer describe what an override replaced.
        locations = {p: n for p, n in locations.items()
                     if not any(p[: len(o)] == o for o in overridden)}
    try:
        spec = validate(raw, locations, file, overridden)
    except SpecError as err:
        raise SpecError(_sorted(problems + err.problems), err.partial) from None
    source = SpecSource(file, raw, locations, spec, overridden)
    if problems:
        raise SpecError(_sorted(problems), source)
    return source

"""Read a spec file: its text, then its YAML as plain data with the line of every key and item.

YAML rules of a spec (a subset of YAML 1.2's core schema, chosen so that nothing surprises):
- only `true` / `false` are booleans: `mode: off`, `yes`, `no`, `on` stay strings;
- `1e-6`, `1.5e-4`, `3E-4` are floats (YAML 1.1 reads them as strings), `1_000` is an int;
- `24:00:00` and `2024-01-01` stay strings (no sexagesimal numbers, no timestamps);
- one document per file, string keys only, no duplicate keys, no tags beyond the core ones;
- anchors, aliases and merge keys (`<<: *defaults`) work, up to `NODE_BUDGET` values in all;
- a file over `MAX_BYTES` (1 MiB; a spec is a few KB) is refused before it is parsed.

Problems carry the file and line. Most are collected (every duplicate key of a file); one
that leaves the data untrustworthy (size, depth, a recursive alias, YAML that does not parse)
stops the reading.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from spec.errors import OVERRIDE_FILE, KeyPath, Problem, SpecError, describe_value, in_file_order
from spec.models import Spec

Locations = dict[KeyPath, int]

# Real specs are a few KB. Larger input is refused before the (pure-Python) parser reads it:
# a 10 MB file would take a minute and over half a GB to parse.
MAX_BYTES = 1 << 20
# Values (mapping values and list items) a document may hold: counted once per node while
# parsing, and again while building the data, where an alias counts each time it is used
# (a billion-laughs document is tiny text whose aliases multiply into billions of values).
NODE_BUDGET = 100_000
MAX_DEPTH = 64

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
        leading = this_line[: len(this_line) - len(this_line.lstrip(" \t"))]
        hint = ("indent with spaces: YAML does not allow tabs" if "\t" in leading else
                f"remove the tab at column {column} (YAML allows no tab here; quote a value "
                "that holds one)")
    elif "expected <block end>" in problem:
        hint = ("this line's indentation matches no key above it: indent it as its siblings"
                + (f" ({hint})" if hint else ""))
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
        raise SpecError(in_file_order(list(dict.fromkeys(builder.problems))))
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


# --------------------------------------------------------------------------- files


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

"""pydantic's validation errors of a `Spec` in a person's words: one `Problem` each.

Each problem names the key as written and says what is wrong, with a hint where one is
known: a did-you-mean, the section a misplaced key belongs to, the fix of a usual type slip
(a quoted number, `yes` for true). The problems are unlocated; `spec.loader.locate` adds the
file and line.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import ValidationError

from spec.errors import KeyPath, Problem, SpecError, describe_value, dotted
from spec.models import Spec
from spec.secrets import looks_secret, mask, secret_name
from spec.walk import child, is_model, union_members, union_tags, unwrap, walk
from spec.yaml_reader import load_value


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
    model = unwrap(model)
    members = union_members(model) or [model]
    for m in members:
        m = unwrap(m)
        if typing.get_origin(m) is list:
            found += _homes(typing.get_args(m)[0], key, (*prefix, 0), depth)
        elif is_model(m) and depth >= 0:
            if key in m.model_fields and prefix:
                found.append(prefix)
            for name, f in m.model_fields.items():
                found += _homes(f.annotation, key, (*prefix, name), depth - 1)
    return list(dict.fromkeys(found))


def _other_members_key(path: KeyPath, model: Any, key: str) -> str | None:
    """For a member of a tagged union (a filters stage): the other types that take ``key``."""
    if not is_model(model) or "type" not in model.model_fields:
        return None
    tp: Any = Spec
    for part in path[:-1]:
        tp = child(tp, part)
    tags = union_tags(union_members(tp))
    having = [tag for tag, m in tags.items() if key in m.model_fields and m is not model]
    if not having:
        return None
    this = next((tag for tag, m in tags.items() if m is model), model.__name__)
    return f"'{key}' is a key of the {' and '.join(having)} type, not of {this}"


def _unknown_key(path: KeyPath, parent: Any, value: Any) -> Problem:
    key = path[-1]
    model = unwrap(parent)
    fields = list(model.model_fields) if is_model(model) else []
    hint = _did_you_mean(key, fields)
    if hint is None and isinstance(key, str):
        hint = _other_members_key(path, model, key)
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
    tp = unwrap(tp)
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
    path, tp, parent, _ = walk(tuple(err["loc"]), raw)
    name = path[-1] if path else None

    if kind == "extra_forbidden":
        return _unknown_key(path, parent, value)
    if kind == "missing":
        f = unwrap(parent).model_fields.get(name) if is_model(unwrap(parent)) else None
        what = "section" if f is not None and is_model(unwrap(f.annotation)) else "key"
        about = f.description if f is not None else None
        if not about and what == "section":
            about = " ".join((unwrap(f.annotation).__doc__ or "").split())
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
        tags := union_tags(union_members(tp))
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
        model = unwrap(tp)
        if kind == "model_type" and is_model(model):
            expected = f"a mapping (the {name} section)" if isinstance(name, str) else "a mapping"
        elif expected not in ("null",):
            expected = ("an " if expected[0] in "aeiou" else "a ") + expected
        hint = _type_hint(_TYPE_WORDS[kind], value)
        if value is None and kind == "model_type" and is_model(unwrap(parent)):
            f = unwrap(parent).model_fields.get(name)
            if f is not None and not f.is_required():
                hint = "remove the key to use the defaults, or give its keys"
        return Problem(path, f"expected {expected}, got {describe_value(value)}", hint)
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return Problem(path, f"must be {words} {_number(ctx.get(key))}, got {value!r}")
    if kind == "finite_number":
        return Problem(path, f"must be a finite number, got {value!r}",
                       "give a number (YAML's .inf and .nan are not numbers a spec can use)")
    if kind in ("too_short", "too_long"):
        n = ctx.get("min_length" if kind == "too_short" else "max_length")
        words = "at least" if kind == "too_short" else "at most"
        got = ctx.get("actual_length", len(value) if isinstance(value, list) else "?")
        return Problem(path, f"needs {words} {n} item{'s' if n != 1 else ''}, got {got}")
    if kind == "string_pattern_mismatch":
        f = unwrap(parent).model_fields.get(name) if is_model(unwrap(parent)) else None
        hint = f.description if f is not None else None
        return Problem(path, f"{value!r} does not match the pattern {ctx.get('pattern')}", hint)
    if kind in ("value_error", "assertion_error"):
        error = ctx.get("error")
        text = str(error) if error is not None else err["msg"].removeprefix("Value error, ")
        if path and path[-1] == "[key]":  # a mapping key's validator: the key is the place
            path = path[:-1]
        return Problem(path, text, getattr(error, "hint", None))
    if kind == "invalid_key":
        return Problem(path[:-1], f"key {value!r} is {describe_value(value)}, not a string",
                       f"quote it: '{value}'")
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else kind
    return Problem(path, f"{msg.replace('Input should', 'should').replace('input', 'value')} "
                   f"(got {describe_value(value)})")


def _masked(problem: Problem, value: Any) -> Problem:
    """The problem without the secret it would quote: a value that looks like a credential,
    or any value of a `cluster.env` variable whose name is a secret's, is shown masked."""
    path = problem.path
    under_secret = (len(path) == 3 and path[:2] == ("cluster", "env")
                    and isinstance(path[2], str) and secret_name(path[2]))
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return problem
    text = str(value)
    if not text or not (under_secret or (isinstance(value, str) and looks_secret(value))):
        return problem

    def hide(words: str | None) -> str | None:
        if words is None:
            return None
        return words.replace(text, mask(text)).replace(text[:37], mask(text))

    return Problem(path, hide(problem.message) or "", hide(problem.suggestion),
                   problem.severity, problem.file, problem.line, problem.related)


def problems_from_validation(error: ValidationError, raw: Any) -> list[Problem]:
    """Every error of a pydantic ValidationError of `Spec`, as unlocated Problems."""
    return _misspelt_required(list(dict.fromkeys(
        _problem_from(e, raw) if e["loc"][-1:] == ("[key]",)  # a name: the refusal hides it
        else _masked(_problem_from(e, raw), e.get("input"))
        for e in error.errors(include_url=False))))


def _misspelt_required(problems: list[Problem]) -> list[Problem]:
    """A misspelt required key (``step:`` for ``steps:``) is one problem, the unknown key's,
    not that and a missing ``steps`` too."""
    missing = {p.path: p for p in problems if p.message.startswith("missing required ")}
    merged: set[tuple] = set()
    out = []
    for p in problems:
        close = re.fullmatch(r"did you mean '(.+)'\?", p.suggestion or "")
        meant = (*p.path[:-1], close[1]) if close else None
        if p.message.startswith("unknown key ") and meant in missing:
            merged.add(meant)
            what = missing[meant].message.split(" ")[2]  # key / section
            p = replace(p, message=f"{p.message}: the required {what} '{close[1]}' is missing")
        out.append(p)
    return [p for p in out if p.path not in merged or not p.message.startswith("missing ")]

"""`--set dotted.path=value` overrides, applied to the loaded data before validation.

A path names mapping keys with dots and list items with an index: `train.parallelism.tensor`,
`filters[1].action` or `filters.1.action`. Missing mappings on the way are created
(`--set sft.steps=50` adds an `sft` section, `--set filters[0].type=history` a list); index
len(list) appends an item, a negative index counts from the end. The value is
YAML under the file's rules (`lr=1e-6` is a float, `mode=off` a string, `x=[1, 2]` a list), and
the result is validated exactly like the file: problems name the field, with file "--set".
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from spec.errors import OVERRIDE_FILE, KeyPath, PathPart, Problem, SpecError, describe_value, dotted
from spec.secrets import looks_secret, mask, mask_override
from spec.yaml_reader import load_value

_KEY = re.compile(r"[^.\[\]=\s]+")
_INDEX = re.compile(r"\[(-?[0-9]+)\]")
_USAGE = "write --set dotted.path=value, e.g. --set train.steps=100 or --set filters[0].action=drop"


def parse_path(text: str) -> list[PathPart] | None:
    """'filters[1].action' → ['filters', 1, 'action']; None when malformed.

    A digit key after a dot ('filters.1') stays a string: whether it indexes a list or names
    a mapping key (`cluster.env.1`) is known only when the path is applied.
    """
    parts: list[PathPart] = []
    i = 0
    while i < len(text):
        if (m := _INDEX.match(text, i)) is not None:
            parts.append(int(m.group(1)))
        else:
            if parts:
                if text[i] != ".":
                    return None
                i += 1
            if (m := _KEY.match(text, i)) is None:
                return None
            parts.append(m.group(0))
        i = m.end()
    return parts or None


def _problem(path: KeyPath, message: str, text: str, hint: str | None = None) -> Problem:
    return Problem(path, f"{message} (in --set {mask_override(text)})", hint, file=OVERRIDE_FILE)


def _apply_one(data: dict[str, Any], text: str) -> tuple[KeyPath, list[KeyPath]] | Problem:
    """Set one override in place: (the path set, mappings created on the way) or a Problem."""
    if "=" not in text:
        return Problem((), f"malformed override '{mask_override(text)}': no '='", _USAGE,
                       file=OVERRIDE_FILE)
    key, value_text = text.split("=", 1)
    parts = parse_path(key.strip())
    if parts is None:
        return _problem((), f"malformed path '{key.strip()}'", text, _USAGE)
    try:
        value = load_value(value_text)
    except SpecError as err:
        shown, why = value_text.strip(), err.problems[0].message
        if looks_secret(shown) or mask_override(text) != text:  # YAML's words may quote it
            shown, why = mask(shown), "the YAML parser's words would show it"
        return _problem(tuple(parts),
                        f"the value {shown!r} is not valid YAML: {why}",
                        text, "quote a value that holds YAML punctuation, e.g. name='a: b'")
    container: Any = data
    resolved: list[PathPart] = []
    created: list[KeyPath] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = dotted(tuple(resolved))
        if isinstance(container, list):
            if isinstance(part, str) and re.fullmatch(r"-?[0-9]+", part):
                part = int(part)
            if not isinstance(part, int):
                return _problem((*resolved, part), f"{here} is a list, not a mapping", text,
                                f"give an item index, e.g. {here}[0].{part}")
            n = len(container)
            index = part + n if part < 0 else part
            if not 0 <= index <= n:
                return _problem(tuple(resolved), f"{here} has {n} item{'s' if n != 1 else ''}, "
                                f"no index {part}", text,
                                f"indices start at 0; {here}[{n}] appends an item")
            if index == n:
                container.append(None)
            part = index
        elif isinstance(container, dict):
            if isinstance(part, int):
                where = here if resolved else "the spec"
                return _problem(tuple(resolved), f"{where} is a mapping, not a list", text,
                                f"name a key: {here}.<key>" if resolved else _USAGE)
        else:
            return _problem(tuple(resolved), f"{here} is {describe_value(container)}, so it has no "
                            f"key '{part}'", text, f"set {here} itself, e.g. --set {here}=...")
        resolved.append(part)
        if last:
            container[part] = copy.deepcopy(value)
        else:
            # Create what is missing on the way (a null section counts as missing): a list
            # when an index follows (`filters[0].type` or `filters.0.type`), else a mapping.
            current = container.get(part) if isinstance(container, dict) else container[part]
            if current is None:
                after = parts[i + 1]
                is_index = isinstance(after, int) or re.fullmatch(r"-?[0-9]+", after)
                container[part] = [] if is_index else {}
                created.append(tuple(resolved))
            container = container[part]
    return tuple(resolved), created


def apply_overrides_tracked(
    raw: dict[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], list[Problem], dict[KeyPath, str]]:
    """Like `apply_overrides`, also returning each path set or created, with its --set text."""
    data = copy.deepcopy(raw)
    problems: list[Problem] = []
    overridden: dict[KeyPath, str] = {}
    applied: list[tuple[KeyPath, str]] = []
    for text in overrides:
        # On a copy: an override that fails half-way must leave nothing behind.
        trial = copy.deepcopy(data)
        result = _apply_one(trial, text)
        if isinstance(result, Problem):
            problems.append(result)
            continue
        data = trial
        path, created = result
        # A later override replaces what earlier ones set below it.
        for earlier in [p for p in overridden if p[: len(path)] == path]:
            del overridden[earlier]
        for p in (*created, path):
            overridden[p] = text
        applied.append((path, text))
    # A replaced override is checked by no model, but every --set is recorded in the bundle.
    for path, text in applied:
        if overridden.get(path) != text and mask_override(text) != text:
            problems.append(Problem(
                (), f"--set {mask_override(text)} holds a secret; a later --set replaces it, "
                "but every --set is recorded in the bundle (manifest.json)",
                "leave it out: a secret goes in the environment, named in "
                "cluster.env_passthrough", file=OVERRIDE_FILE))
    return data, problems, overridden


def apply_overrides(
    raw: dict[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], list[Problem]]:
    """Apply `--set path=value` overrides to a copy of `raw`; problems for those that cannot be."""
    data, problems, _ = apply_overrides_tracked(raw, overrides)
    return data, problems

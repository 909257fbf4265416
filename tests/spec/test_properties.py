"""Property tests: any edit of a valid spec loads as a Spec or fails as a located SpecError.

Edits are drawn at random paths of the minimal spec: delete a key or item, rename a key
(typo or random text), replace a value by a random YAML scalar/list/mapping, insert an unknown
(or known) key. The edited data is dumped to YAML and loaded back, so the YAML rules (non-string
keys, odd strings) are exercised too. Never any exception other than SpecError.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from spec import models
from spec.errors import Problem, SpecError, dotted
from spec.loader import OVERRIDE_FILE, load_data, load_spec, validate
from spec.models import Spec

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _vocabulary() -> tuple[list[str], list[str]]:
    """Every field name and literal value of the models: edits that come close to valid."""
    names: set[str] = set()
    values: set[str] = set()
    for obj in vars(models).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            for name, f in obj.model_fields.items():
                names.add(name)
                for arg in _literal_args(f.annotation):
                    values.add(arg)
    return sorted(names), sorted(values)


def _literal_args(tp: Any) -> list[str]:
    if typing.get_origin(tp) is Literal:
        return [a for a in typing.get_args(tp) if isinstance(a, str)]
    return [a for arg in typing.get_args(tp) for a in _literal_args(arg)]


FIELD_NAMES, LITERALS = _vocabulary()
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
# Non-string keys are rare (1 in 10): each stops a document at the YAML stage.
KEYS = st.integers(0, 9).flatmap(
    lambda i: (st.integers(-3, 3) | st.booleans()) if i == 0
    else st.sampled_from(FIELD_NAMES) if i < 6 else TEXT
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.integers(1, 64),
    st.floats(), st.floats(0, 1), TEXT,
    st.sampled_from(LITERALS),
    st.sampled_from(["1e-6", "off", "yes", "24:00:00", "2024-01-01", "<<", "~", "", "8", "-1"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)


def paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every mapping key and list item below `data`."""
    out = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(
        data, list) else []
    for key, value in items:
        out.append((*prefix, key))
        out += paths(value, (*prefix, key))
    return out


def mappings(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths of every mapping, the root included."""
    out = [prefix] if isinstance(data, dict) else []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(
        data, list) else []
    for key, value in items:
        out += mappings(value, (*prefix, key))
    return out


def at(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def typo(key: str, draw) -> str:
    if not key:
        return "x"
    i = draw(st.integers(0, len(key) - 1))
    kind = draw(st.sampled_from(["drop", "double", "swap", "upper"]))
    if kind == "drop":
        return key[:i] + key[i + 1:] or "x"
    if kind == "double":
        return key[:i] + key[i] + key[i:]
    if kind == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2:]
    return key.upper()


@st.composite
def edited_specs(draw, base: dict) -> dict:
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "rename", "replace", "insert"]))
        if op == "insert":
            target = at(data, draw(st.sampled_from(mappings(data))))
            target[draw(KEYS)] = draw(VALUES)
            continue
        candidates = paths(data)
        if not candidates:
            continue
        path = draw(st.sampled_from(candidates))
        parent, key = at(data, path[:-1]), path[-1]
        if op == "delete":
            del parent[key]
        elif op == "replace" or isinstance(parent, list) or not isinstance(key, str):
            parent[key] = draw(VALUES)
        else:
            new = typo(key, draw) if draw(st.booleans()) else draw(KEYS)
            parent[new] = parent.pop(key)
    return data


def check(problems: list[Problem]) -> None:
    assert problems
    for p in problems:
        assert isinstance(p, Problem)
        assert p.path or p.line is not None or p.file == OVERRIDE_FILE, p.format()
        assert p.message and p.format()


@SETTINGS
@given(data=st.data())
def test_random_edits_give_a_spec_or_located_problems(data, minimal_spec) -> None:
    edited = data.draw(edited_specs(minimal_spec))
    text = yaml.safe_dump(edited, sort_keys=False, allow_unicode=True)
    try:
        raw, locations = load_data(text, "edited.yaml")
        spec = validate(raw, locations, "edited.yaml")
    except SpecError as err:
        check(err.problems)
        assert err.format().startswith(f"{len(err.problems)} problem")
    else:
        assert isinstance(spec, Spec)


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory, minimal_spec) -> Path:
    path = tmp_path_factory.mktemp("props") / "spec.yaml"
    path.write_text(yaml.safe_dump(minimal_spec, sort_keys=False))
    return path


@SETTINGS
@given(data=st.data())
def test_random_overrides_give_a_spec_or_located_problems(data, spec_file, minimal_spec) -> None:
    overrides = []
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            path = dotted(data.draw(st.sampled_from(paths(minimal_spec))))
        else:
            path = data.draw(st.one_of(TEXT, st.sampled_from(FIELD_NAMES)))
        if data.draw(st.booleans()):
            value = yaml.safe_dump(data.draw(VALUES), default_flow_style=True, width=10**6)
            value = value.removesuffix("\n").removesuffix("\n...")
        else:
            value = data.draw(TEXT)
        overrides.append(f"{path}={value}" if data.draw(st.integers(0, 9)) else path)
    try:
        src = load_spec(spec_file, overrides)
    except SpecError as err:
        check(err.problems)
    else:
        assert isinstance(src.spec, Spec)


def test_minimal_spec_round_trips(minimal_spec) -> None:
    raw, locations = load_data(yaml.safe_dump(minimal_spec, sort_keys=False), "m.yaml")
    assert raw == minimal_spec
    assert validate(raw, locations, "m.yaml") == Spec.model_validate(minimal_spec)


VALID_TEXT = (Path(__file__).parent / "data" / "valid.yaml").read_text()
PUNCTUATION = st.text(st.sampled_from(list(":-[]{}&*!|>'\"#%@`,? \n\t<~.0e")),
                      min_size=1, max_size=4) | st.sampled_from(["<<: *a", "&a ", "*a", "---\n"])


@SETTINGS
@given(data=st.data())
def test_mangled_yaml_text_never_crashes(data) -> None:
    """Random damage to the text (YAML punctuation inserted, spans deleted) of a valid file."""
    text = VALID_TEXT
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()):
            text = text[:i] + data.draw(PUNCTUATION) + text[i:]
        else:
            text = text[:i] + text[i + data.draw(st.integers(1, 8)):]
    try:
        raw, locations = load_data(text, "mangled.yaml")
        spec = validate(raw, locations, "mangled.yaml")
    except SpecError as err:
        check(err.problems)
    else:
        assert isinstance(spec, Spec)

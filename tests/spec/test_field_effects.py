"""No dead knobs: every field of every spec model has an entry in the field-effect table
(``tests/field_effects.py``) naming the evidence of its effect on each path, or the check that
refuses it there; and every piece of evidence names something that exists.

The walk starts at ``spec.models.Spec`` and recurses into nested models, lists, dicts,
optionals and (discriminated) unions, so a field added anywhere fails here until the table
says what it does. ``MISSING`` would list the gaps; ``test_no_field_lacks_evidence`` fails
while any is left. The other tests hold the table's structure.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import typing
from functools import cache
from pathlib import Path
from types import NoneType, UnionType

import pytest
from pydantic import BaseModel

from spec.models import Spec
from tests.field_effects import COMPILE_TIME, EFFECTS, MISSING

ROOT = Path(__file__).resolve().parents[2]

DIMENSIONS: dict[str, tuple[str, ...]] = {
    "train": ("local", "megatron"),
    "rollout": ("local", "vllm"),
    "scheduler": ("local", "slurm"),
    "devices": ("cpu", "gpu"),
}
KINDS = ("test", "check", "refused", "warned", "section", "gpu")
PLAIN = ("doc", "MISSING")
# "doc" beyond single-valued fields: free text with no behaviour.
DOC_FIELDS = {"Spec.description"}


# --------------------------------------------------------------------------- the walk


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """Pydantic models inside a field's type: itself, list/dict items, optional, unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):  # Annotated[...] metadata is not a type: skipped
        found += _models_in(arg)
    return found


@cache
def models() -> dict[str, type[BaseModel]]:
    """Every model reachable from Spec, by class name (names must be unique)."""
    seen: dict[str, type[BaseModel]] = {}
    todo: list[type[BaseModel]] = [Spec]
    while todo:
        model = todo.pop()
        if model.__name__ in seen:
            assert seen[model.__name__] is model, f"two models named {model.__name__}"
            continue
        seen[model.__name__] = model
        for field in model.model_fields.values():
            todo += _models_in(field.annotation)
    return seen


@cache
def fields() -> dict[str, object]:
    """'<Model>.<field>' → the field's annotation, for every field of every model."""
    return {f"{name}.{field}": info.annotation
            for name, model in models().items() for field, info in model.model_fields.items()}


# --------------------------------------------------------------------------- helpers


def _items(evidence: object) -> tuple[str, ...]:
    return evidence if isinstance(evidence, tuple) else (evidence,)  # type: ignore[return-value]


def _all_items() -> list[tuple[str, str, str]]:
    """(field, selector, evidence item) for every piece of evidence in the table."""
    return [(key, selector, item) for key, entry in EFFECTS.items()
            for selector, evidence in entry.items() for item in _items(evidence)]


def _of_kind(kind: str) -> list[tuple[str, str, str]]:
    return [(k, s, i) for k, s, i in _all_items() if i.startswith(kind + ":")]


def _parse_selector(selector: str) -> dict[str, str] | str:
    """{dimension: value} of a selector, or a problem."""
    parts: dict[str, str] = {}
    for part in selector.split("+"):
        dim, _, value = part.partition(":")
        if dim not in DIMENSIONS or value not in DIMENSIONS[dim]:
            return f"unknown path {part!r}"
        if dim in parts:
            return f"dimension {dim!r} twice"
        parts[dim] = value
    return parts


def _single_valued(annotation: object) -> bool:
    """A Literal of one value (possibly Optional): there is nothing to choose."""
    args = [a for a in typing.get_args(annotation) if a is not NoneType] \
        if typing.get_origin(annotation) in (typing.Union, UnionType) else [annotation]
    return len(args) == 1 and typing.get_origin(args[0]) is typing.Literal \
        and len(typing.get_args(args[0])) == 1


@cache
def _test_names(path: str) -> frozenset[str] | None:
    """Test functions of a file, methods of test classes as 'Class::method' (None: no file)."""
    file = ROOT / path
    if not file.is_file():
        return None
    tree = ast.parse(file.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{item.name}" for item in node.body
                         if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef))
    return frozenset(names)


# --------------------------------------------------------------------------- (a) coverage


def test_the_walk_reaches_every_kind_of_nesting() -> None:
    """Sanity of the walk itself: models behind lists, optionals and the stage union."""
    names = set(models())
    assert {"Spec", "Verifier", "Container", "MLA", "MoE", "ArithmeticTask", "OfflinePassRate",
            "FlatGroups", "History", "LengthPenalty"} <= names
    assert len(fields()) >= 200


def test_every_field_has_an_entry_and_every_entry_a_field() -> None:
    known = set(fields())
    missing = sorted(known - set(EFFECTS))
    stale = sorted(set(EFFECTS) - known)
    stale_missing = sorted(set(MISSING) - known)
    stale_compile = sorted(set(COMPILE_TIME) - known)
    assert not missing, "fields without an entry in tests/field_effects.py: " + ", ".join(missing)
    assert not stale, "entries that are not fields (stale): " + ", ".join(stale)
    assert not stale_missing, "MISSING entries that are not fields: " + ", ".join(stale_missing)
    assert not stale_compile, "COMPILE_TIME entries that are not fields: " + ", ".join(stale_compile)


# --------------------------------------------------------------------------- structure


def test_selectors_name_paths_and_cover_every_combination() -> None:
    problems = []
    for key, entry in EFFECTS.items():
        if not entry:
            problems.append(f"{key}: no evidence")
            continue
        if "all" in entry:
            if len(entry) > 1:
                problems.append(f"{key}: 'all' must stand alone")
            continue
        parsed = {}
        for selector in entry:
            got = _parse_selector(selector)
            if isinstance(got, str):
                problems.append(f"{key}: {selector!r}: {got}")
            else:
                parsed[selector] = got
        dims = sorted({d for p in parsed.values() for d in p})
        for combo in itertools.product(*(DIMENSIONS[d] for d in dims)):
            path = dict(zip(dims, combo, strict=True))
            if not any(all(path[d] == v for d, v in p.items()) for p in parsed.values()):
                problems.append(f"{key}: nothing covers "
                                + "+".join(f"{d}:{v}" for d, v in path.items()))
    assert not problems, "\n".join(problems)


def test_evidence_is_well_formed() -> None:
    problems = []
    annotations = fields()
    for key, selector, item in _all_items():
        where = f"{key} [{selector}]"
        if item in PLAIN:
            continue
        kind, sep, name = item.partition(":")
        if not sep or kind not in KINDS or not name:
            problems.append(f"{where}: {item!r} is not evidence ({', '.join(KINDS)}:<name>, "
                            f"{' or '.join(PLAIN)})")
    for key, entry in EFFECTS.items():
        items = [i for e in entry.values() for i in _items(e)]
        if "doc" in items:
            if len(items) > 1:
                problems.append(f"{key}: 'doc' must be the only evidence")
            if key not in DOC_FIELDS and not _single_valued(annotations.get(key)):
                problems.append(f"{key}: 'doc' is for free text ({', '.join(sorted(DOC_FIELDS))}) "
                                "and single-valued fields only")
        for item in items:
            if item.startswith("section:"):
                model = models().get(item.split(":", 1)[1])
                if model is None or annotations.get(key) is not model:
                    problems.append(f"{key}: {item!r}: the field's type is not exactly that "
                                    "model (an optional section has an effect of its own)")
        if items and all(i.startswith("check:") for i in items) and key not in COMPILE_TIME:
            problems.append(f"{key}: only check: evidence, but the field is not in COMPILE_TIME "
                            "(pair the check with a test of its run-time effect)")
        if "MISSING" in items and key not in MISSING:
            problems.append(f"{key}: evidence 'MISSING' without a MISSING[{key!r}] note")
        if key in MISSING and "MISSING" not in items:
            problems.append(f"{key}: has a MISSING note but no path says 'MISSING' (stale note)")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- GPU checks


def _gpu_checks() -> set[str]:
    """The parts of the GPU check (``tools/gpu_check.sh``): its ``jobs`` step and the sections
    of ``bench/gpu.py`` it runs."""
    bench = (ROOT / "bench" / "gpu.py").read_text(encoding="utf-8")
    script = (ROOT / "tools" / "gpu_check.sh").read_text(encoding="utf-8")
    sections = {line.split('"')[1] for line in bench.splitlines()
                if line.strip().startswith(("if section ==", "elif section =="))}
    return sections | ({"jobs"} if "1. the jobs" in script else set())


def test_gpu_evidence_names_a_part_of_the_gpu_check_on_a_gpu_path() -> None:
    """``gpu:<part>``: measured by the GPU check on a GPU (bench/RESULTS.md §5), which CI
    cannot run; only on selectors of ``devices:gpu``."""
    known = _gpu_checks()
    assert {"jobs", "conformance", "throughput"} <= known, known
    problems = [f"{key} [{selector}]: {item!r}" for key, selector, item in _of_kind("gpu")
                if item.split(":", 1)[1] not in known or "devices:gpu" not in selector]
    assert not problems, "GPU evidence of no GPU check or off a devices:gpu path:\n" + \
        "\n".join(problems)


# --------------------------------------------------------------------------- (b) tests


def test_every_named_test_exists() -> None:
    problems = []
    for key, selector, item in _of_kind("test"):
        target = item.split(":", 1)[1]
        path, sep, test = target.partition("::")
        names = _test_names(path)
        if not sep or not test:
            problems.append(f"{key} [{selector}]: {item!r} is not test:<file>::<test>")
        elif names is None:
            problems.append(f"{key} [{selector}]: no file {path}")
        elif test not in names:
            problems.append(f"{key} [{selector}]: {path} defines no test {test}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- (c) checks


def test_every_named_check_is_a_rule() -> None:
    from compiler import checks

    rules = {rule.__name__ for rule in checks.RULES}
    problems = []
    for kind in ("check", "warned"):
        for key, selector, item in _of_kind(kind):
            name = item.split(":", 1)[1]
            if not callable(getattr(checks, name, None)):
                problems.append(f"{key} [{selector}]: compiler.checks has no {name}")
            elif name not in rules:
                problems.append(f"{key} [{selector}]: {name} is not in compiler.checks.RULES")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- (d) refusals


def test_every_named_refusal_is_a_capability_rule() -> None:
    """Refusals live in the torch-free ``runtime.capabilities``: ``RULES: dict[str, rule]`` of
    the spec, and ``FLAG_RULES`` (if any) of the rendered Megatron flags. Until that module
    exists, every refused: name is reported here."""
    named = sorted({item.split(":", 1)[1] for _, _, item in _of_kind("refused")})
    try:
        capabilities = importlib.import_module("runtime.capabilities")
    except ModuleNotFoundError as err:
        if err.name != "runtime.capabilities":
            raise
        pytest.fail("runtime.capabilities does not exist: unknown refusal rules "
                    + ", ".join(named))
    rules = getattr(capabilities, "RULES", None)
    assert isinstance(rules, dict), "runtime.capabilities.RULES is not a dict of rules"
    known = {**getattr(capabilities, "FLAG_RULES", {}), **rules}
    unknown = [name for name in named if name not in known]
    assert not unknown, ("refused: names not in runtime.capabilities.RULES (or FLAG_RULES): "
                         + ", ".join(unknown))


# --------------------------------------------------------------------------- gaps


def test_no_field_lacks_evidence() -> None:
    """Every field has evidence or a refusal on every path (the audit of issue "What validates,
    runs" found 58 gaps; the last closed with the Megatron bf16 test). A new field enters the
    table with its evidence, never as a gap."""
    assert not MISSING, "field(s) without evidence on some path:\n" + "\n".join(
        f"  {key}: {note}" for key, note in MISSING.items())

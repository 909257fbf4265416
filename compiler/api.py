"""The compile pipeline as pure functions: spec file → SpecSource → Plan → JobGraph → files.

The CLI and the tests call these; side effects (writing a bundle, submitting it) live in
`compiler.bundle` and `compiler.submit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from compiler.checks import check
from compiler.graph import JobGraph, build_graph
from compiler.plan import Plan, make_plan
from compiler.render import render_bundle
from spec.errors import Problem, SpecError
from spec.loader import SpecSource, load_spec, read_text


@dataclass(frozen=True)
class Validated:
    source: SpecSource
    plan: Plan
    warnings: tuple[Problem, ...]


@dataclass(frozen=True)
class Compiled:
    validated: Validated
    graph: JobGraph
    files: dict[str, str]  # bundle-relative path → text, manifest.json included


def validate(path: str | Path, overrides: Sequence[str] = ()) -> Validated:
    """Shape, then meaning. Raises SpecError with every located problem of the spec."""
    source = load_spec(path, overrides)
    plan = make_plan(source.spec)
    problems = [source.locate(p) for p in check(source.spec, plan)]
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise SpecError(errors)
    return Validated(source, plan, tuple(p for p in problems if p.severity == "warning"))


def compile_spec(path: str | Path, overrides: Sequence[str] = ()) -> Compiled:
    validated = validate(path, overrides)
    spec = validated.source.spec
    graph = build_graph(spec, validated.plan)
    files = render_bundle(
        spec, validated.plan, graph,
        source_text=read_text(path), source_name=Path(path).name, overrides=tuple(overrides),
    )
    return Compiled(validated, graph, files)

"""The compile pipeline as pure functions: spec file → SpecSource → Plan → JobGraph → files.

The CLI and the tests call these; side effects (writing a bundle, submitting it) live in
`compiler.bundle` and `compiler.submit`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.checks import HEAD_DIM, RULES, check
from compiler.graph import JobGraph, build_graph
from compiler.inputs import anchored, missing_inputs, unmounted_inputs
from compiler.plan import Plan, make_plan
from compiler.render import render_bundle
from runtime import capabilities
from runtime.capabilities import Refusal
from runtime.preflight import checkpoint_mismatches, preflight_bundle
from spec.errors import Problem, SpecError
from spec.loader import SpecSource, load_spec, read_text
from spec.partial import InvalidValueUsed
from spec.secrets import redacted


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
    # What the jobs would refuse at start (located); non-empty only with preflight=False.
    refusals: tuple[Problem, ...] = ()


def validate(path: str | Path, overrides: Sequence[str] = ()) -> Validated:
    """Shape, meaning, then every job's preflight. Raises SpecError with every located
    problem of the spec. A spec that validates is one every job of its bundle accepts."""
    return compile_spec(path, overrides).validated


def compile_spec(path: str | Path, overrides: Sequence[str] = (), *,
                 preflight: bool = True) -> Compiled:
    """The bundle of a spec. With ``preflight`` (validate, compile, run) what a job would
    refuse at start is an error; without it (inspect, renderer tests) it is returned in
    ``Compiled.refusals`` for the caller to show beside the plan."""
    try:
        source = load_spec(path, overrides)
    except SpecError as err:
        if err.partial is None:
            raise
        raise SpecError(err.problems + partial_problems(err.partial)) from None
    base = Path(path).resolve().parent
    source = dataclasses.replace(source, spec=anchored(source.spec, base))
    spec, plan = source.spec, make_plan(source.spec)
    problems = [source.locate(p) for p in check(spec, plan) + unmounted_inputs(spec)]
    if checkpoint_config(spec.model_dump(mode="json"), base) is not None:
        # The checkpoint's own config.json decides its head_dim (compared field by field):
        # checkpoint_head_dim is for a checkpoint that cannot be read from here.
        problems = [p for p in problems if p.path != HEAD_DIM]
    graph, files = None, {}
    if not any(p.severity == "error" for p in problems):  # a bundle needs a sound plan
        graph = build_graph(spec, plan)
        text, hidden = redacted(read_text(path))  # comments: no check reads them
        problems += [Problem((), f"this line holds what looks like {what}: the bundle's copy "
                                 "of the spec masks it", "remove it from the spec file; pass "
                                 "secrets through cluster.env_passthrough",
                             severity="warning", file=str(path), line=line)
                     for line, what in hidden]
        files = render_bundle(
            spec, plan, graph,
            source_text=text, source_name=Path(path).name, overrides=tuple(overrides),
        )
        refusals = preflight_bundle(files, base=base)
    else:  # the runtime's rules still speak: every problem of the file at once
        dumped = spec.model_dump(mode="json")
        refusals = capabilities.refusals(dumped, "rl")
        problems += [source.locate(p) for p in checkpoint_problems(dumped, base)]
    # A local run's missing input is a start-up failure too: inspect shows it beside the plan.
    refused = [source.locate(p) for p in refusal_problems(refusals) + missing_inputs(spec)]
    errors = [p for p in problems if p.severity == "error"] + (refused if preflight else [])
    if errors:
        raise SpecError(errors)
    assert graph is not None
    validated = Validated(source, plan, tuple(p for p in problems if p.severity == "warning"))
    return Compiled(validated, graph, files, () if preflight else tuple(refused))


class _NoPlan:
    """The plan of a spec whose values it needs did not validate: a rule that reads it stops."""

    def __getattr__(self, name: str) -> Any:
        raise InvalidValueUsed(("plan", name))


def partial_problems(source: SpecSource) -> list[Problem]:
    """The errors the checks and the runtime's rules find in what did validate of a spec
    (`source.spec` may hold `spec.partial.Invalid` values): a rule, or the plan, that uses a
    value that did not validate is skipped, so no error is reported twice or made up."""
    spec = source.spec
    try:
        plan: Any = make_plan(spec)
    except Exception:  # it needs a value that did not validate
        plan = _NoPlan()
    problems: list[Problem] = []
    for rule in RULES:
        try:
            problems += [p for p in rule(spec, plan) if p.severity == "error"]
        except Exception:  # same: the rule reads an invalid value
            continue
    try:
        dumped = spec.model_dump(mode="json")
        refusals = capabilities.refusals(dumped, "rl")
        problems += checkpoint_problems(dumped, Path(source.file).resolve().parent)
    except Exception:  # the dump, or a rule, meets an invalid value
        refusals = []
    return [source.locate(p) for p in problems + refusal_problems(refusals)]


def checkpoint_problems(spec: Mapping[str, Any], base: Path) -> list[Problem]:
    """The architecture against an HF model.checkpoint's config.json where it is readable,
    each difference named. The jobs' preflight compares it on a bundle; this is for a spec
    whose plan has errors, which gets no bundle: every problem of the file at once."""
    found = checkpoint_config(spec, base)
    if found is None:
        return []
    cfg_file, cfg = found
    return [Problem(r.path, r.message, r.hint)
            for r in checkpoint_mismatches(spec["model"]["architecture"], cfg, str(cfg_file))]


def checkpoint_config(spec: Mapping[str, Any], base: Path) -> tuple[Path, dict] | None:
    """(path, content) of an HF model.checkpoint's config.json, None where not readable."""
    model = spec["model"]
    if model.get("checkpoint") is None or model.get("checkpoint_format") != "hf":
        return None
    cfg_file = base / str(model["checkpoint"]) / "config.json"  # an absolute path stays
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not readable from here (e.g. a compute-node mount)
        return None
    return (cfg_file, cfg) if isinstance(cfg, dict) else None


def refusal_problems(refusals: Sequence[Refusal]) -> list[Problem]:
    """One error per refused setting, naming every job that would refuse it at start."""
    jobs: dict[tuple, list[str]] = {}
    first: dict[tuple, Refusal] = {}
    for r in refusals:
        key = (r.path, r.message)
        first.setdefault(key, r)
        if r.job not in jobs.setdefault(key, []):
            jobs[key].append(r.job)
    return [Problem(r.path, f"{r.message} (job{'s' if len(jobs[k]) > 1 else ''} "
                            f"{', '.join(jobs[k])} would refuse to start)", r.hint)
            for k, r in first.items()]

"""Load a spec file: YAML with line numbers, then strict validation, all problems at once.

Three pure steps the compiler can reuse: `load_data` (text → plain data + the line of every
key and list item; `spec.yaml_reader`, which also states the YAML rules of a spec), `validate`
(data → `Spec`, pydantic errors turned into located `Problem`s, worded by
`spec.pydantic_errors`), and `load_spec` (file + `--set` overrides → `SpecSource`). What
callers use of those modules is importable from here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from spec.errors import OVERRIDE_FILE, KeyPath, Problem, SpecError, describe_value, in_file_order
from spec.models import Spec
from spec.overrides import apply_overrides_tracked
from spec.pydantic_errors import problems_from_validation
from spec.secrets import mask_override, secrets_in
from spec.yaml_reader import (
    MAX_BYTES,
    MAX_DEPTH,
    NODE_BUDGET,
    Locations,
    load_data,
    load_value,
    read_text,
)

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "NODE_BUDGET",
    "OVERRIDE_FILE",
    "KeyPath",
    "Locations",
    "SpecSource",
    "describe_value",
    "load_data",
    "load_spec",
    "load_value",
    "locate",
    "problems_from_validation",
    "read_text",
    "validate",
]


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
            return replace(problem, file=OVERRIDE_FILE, line=None, message=f"{problem.message} "
                           f"(from --set {mask_override(overridden[prefix])})")
        if prefix in locations:
            below = [mask_override(t) for p, t in overridden.items()
                     if p[: len(problem.path)] == problem.path]
            message = problem.message
            if below:
                message += " (after --set " + ", --set ".join(dict.fromkeys(below)) + ")"
            return replace(problem, file=file, line=locations[prefix], message=message)
    return replace(problem, file=file, line=problem.line)


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
    # Imported here: only an invalid spec needs it, and it loads pydantic's TypeAdapter.
    from spec.partial import partial_spec

    try:
        return Spec.model_validate(raw)
    except ValidationError as err:
        problems = problems_from_validation(err, raw)
        spec, skipped = partial_spec(err, raw)
        problems = [locate(p, file, locations, overridden)
                    for p in dict.fromkeys(problems + skipped)]
        partial = SpecSource(file, dict(raw), dict(locations), spec, dict(overridden or {}))
        raise SpecError(in_file_order(problems), partial) from None


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


def _replaced_secrets(data: Mapping[str, Any], locations: Mapping[KeyPath, int], file: str,
                      overridden: Mapping[KeyPath, str]) -> list[Problem]:
    """Secrets of the file that a `--set` replaces: the models never see them, but the file
    is copied into the bundle (spec.yaml)."""
    problems = []
    for path, what in secrets_in(data):
        by = next((t for o, t in overridden.items() if path[: len(o)] == o), None)
        if by is not None:
            line = next((locations[p] for p in _prefixes(path) if p in locations), None)
            problems.append(Problem(
                path, f"{what}; --set {mask_override(by)} replaces it, but the spec file is "
                "copied into the bundle (spec.yaml)", "remove it from the file: a secret "
                "goes in the environment, named in cluster.env_passthrough", file=file,
                line=line))
    return problems


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SpecSource:
    """Read, apply `--set` overrides, validate. SpecError lists every problem of the file."""
    if isinstance(overrides, str):  # one override passed bare, not a list of characters
        overrides = [overrides]
    file = str(path)
    raw, locations = load_data(read_text(path), file)
    problems: list[Problem] = []
    overridden: dict[KeyPath, str] = {}
    if overrides:
        written = raw  # the file is copied into the bundle as it is, overrides or not
        raw, problems, overridden = apply_overrides_tracked(raw, overrides)
        problems += _replaced_secrets(written, locations, file, overridden)
        # Lines of the file no longer describe what an override replaced.
        locations = {p: n for p, n in locations.items()
                     if not any(p[: len(o)] == o for o in overridden)}
    try:
        spec = validate(raw, locations, file, overridden)
    except SpecError as err:
        raise SpecError(in_file_order(problems + err.problems), err.partial) from None
    source = SpecSource(file, raw, locations, spec, overridden)
    if problems:
        raise SpecError(in_file_order(problems), source)
    return source

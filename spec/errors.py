"""Problems found in a spec, and how they are shown to a person.

Every stage of checking (YAML parsing, shape validation, cross-field meaning) reports
`Problem`s; they are collected and raised together as one `SpecError`, so a user sees every
mistake of a file at once. Each problem carries the dotted path of the field, the file and
line where the user wrote it, what is wrong, and a suggestion where one is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from spec.secrets import looks_secret, mask

PathPart = str | int
KeyPath = tuple[PathPart, ...]
# The file a problem of a `--set` override names: the command line.
OVERRIDE_FILE = "--set"
EXIT_BAD_INPUT = 2  # any input the user must fix: a spec, a run directory, an argument
EXIT_INVALID_SPEC = EXIT_BAD_INPUT
EXIT_FAILURE = 1


def dotted(path: tuple[PathPart, ...]) -> str:
    """('train', 'parallelism', 'tensor') → 'train.parallelism.tensor'; ints index: 'filters[1]'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "<root>"


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
        if looks_secret(value):  # a credential is never shown
            return f"the string {mask(value)!r}"
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


class Refusal(ValueError):
    """A model validator's refusal that knows the fix: `spec.pydantic_errors` shows `hint`
    as the problem's hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth a warning) in a spec."""

    path: tuple[PathPart, ...]
    message: str
    suggestion: str | None = None
    severity: Literal["error", "warning"] = "error"
    file: str | None = None
    line: int | None = None
    # Other fields involved in a cross-field rule, shown beside the main path.
    related: tuple[tuple[PathPart, ...], ...] = field(default_factory=tuple)

    @property
    def where(self) -> str:
        loc = self.file or "<spec>"
        return f"{loc}:{self.line}" if self.line else loc

    def located(self, file: str | None, line: int | None) -> Problem:
        return replace(self, file=file, line=line)

    def format(self) -> str:
        field = f"{dotted(self.path)}: " if self.path else ""
        text = f"{self.where}: {self.severity}: {field}{self.message}"
        if self.related:
            text += " (involves " + ", ".join(dotted(p) for p in self.related) + ")"
        if self.suggestion:
            text += f"\n    hint: {self.suggestion}"
        return text


class SpecError(Exception):
    """An invalid spec: one or more problems, all reported together. Exit code 2."""

    exit_code = EXIT_INVALID_SPEC

    def __init__(self, problems: list[Problem], partial: Any = None):
        self.problems = [p for p in problems if p.severity == "error"] or list(problems)
        # What still parsed (a `spec.loader.SpecSource` whose spec may hold `Invalid` values),
        # for later stages to check too: every problem of a file in one run.
        self.partial = partial
        super().__init__(self.format())

    def format(self) -> str:
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the spec:"
        return "\n".join([head, *(p.format() for p in self.problems)])


def in_file_order(problems: list[Problem]) -> list[Problem]:
    """File order: by line, problems without a line (and --set ones) last."""
    return sorted(problems, key=lambda p: (p.file == OVERRIDE_FILE, p.line is None, p.line or 0))

"""The bodies of `rlspec validate` and `rlspec compile`, free of any CLI framework.

Both the typer app (`compiler.cli`) and the fast entry point (`compiler.main`) call these, so
there is one implementation. They print plain lines and return the exit code: 0 success,
2 invalid spec (every problem listed), 1 any other failure.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from spec.errors import EXIT_FAILURE, SpecError


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def validate_command(spec: Path, overrides: Sequence[str]) -> int:
    from compiler.api import validate

    try:
        v = validate(spec, list(overrides))
    except SpecError as exc:
        _err(exc.format())
        return exc.exit_code
    for w in v.warnings:
        _err(w.format())
    n = len(v.warnings)
    print(f"{spec}: valid ({n} warning{'s' if n != 1 else ''})")
    return 0


def compile_command(spec: Path, output: Path, overrides: Sequence[str], force: bool) -> int:
    from compiler.api import compile_spec
    from compiler.bundle import BundleError, write_bundle

    try:
        compiled = compile_spec(spec, list(overrides))
        write_bundle(compiled.files, output, force=force)
    except SpecError as exc:
        _err(exc.format())
        return exc.exit_code
    except (BundleError, OSError) as exc:
        _err(f"error: {exc}")
        return EXIT_FAILURE
    for w in compiled.validated.warnings:
        _err(w.format())
    jobs = compiled.graph.order()
    print(f"wrote {output}: {len(jobs)} jobs ({' → '.join(jobs)}), {len(compiled.files)} files")
    return 0

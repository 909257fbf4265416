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


def compile_command(spec: Path, output: str | Path, overrides: Sequence[str], force: bool) -> int:
    from compiler.api import compile_spec
    from compiler.bundle import BundleError, write_bundle

    kept: list[str] = []
    try:
        compiled = compile_spec(spec, list(overrides))
        write_bundle(compiled.files, output, force=force, kept=kept)
    except SpecError as exc:
        _err(exc.format())
        return exc.exit_code
    except BundleError as exc:  # the output path's problems are bad input (exit 2)
        _err(f"error: {exc}")
        return exc.exit_code
    except OSError as exc:
        _err(f"error: {exc}")
        return EXIT_FAILURE
    for w in compiled.validated.warnings:
        _err(w.format())
    jobs = compiled.graph.order()
    print(f"wrote {output}: {len(jobs)} jobs ({' → '.join(jobs)}), {len(compiled.files)} files")
    if kept:
        print(f"kept what the old bundle did not write: {', '.join(kept)}")
    return 0


def check_command(bundle: Path) -> int:
    """`rlspec check DIR`: every job's preflight on a written bundle (the checks each job
    makes at start), located in the bundle's spec.yaml where the spec still loads."""
    from compiler.api import refusal_problems
    from compiler.bundle import BundleError, read_manifest
    from compiler.edited import describe, edited_train_sh
    from runtime.preflight import preflight_bundle, read_bundle
    from spec.errors import EXIT_BAD_INPUT
    from spec.loader import load_spec

    try:
        manifest = read_manifest(bundle)
        files = read_bundle(bundle)
    except BundleError as exc:  # no such path, not a bundle, a damaged manifest
        _err(f"error: {exc}")
        return EXIT_BAD_INPUT
    except (OSError, ValueError, KeyError) as exc:
        _err(f"error: {bundle}: not a readable bundle ({exc}); run `rlspec compile`")
        return EXIT_BAD_INPUT
    try:
        refusals = preflight_bundle(files, base=Path(bundle).resolve().parent)
    except (ValueError, KeyError, TypeError) as exc:  # a config edited out of shape
        _err(f"error: {bundle}: a job config cannot be read ({exc}); recompile the bundle")
        return EXIT_BAD_INPUT
    jobs = manifest["order"]
    try:
        edited = edited_train_sh(Path(bundle), manifest)
    except SpecError as exc:  # the bundle's spec.resolved.yaml no longer validates
        _err(f"error: {bundle}: its spec.resolved.yaml does not validate; recompile the "
             f"bundle\n{exc}")
        return EXIT_BAD_INPUT
    for found in edited:
        print("\n".join(describe(found)))
    edits = [p for found in edited for p in found.problems]
    if not refusals and not edits:
        print(f"{bundle}: every job's preflight passes ({len(jobs)} jobs: {', '.join(jobs)})")
        return 0
    problems = refusal_problems(refusals)
    try:
        source = load_spec(Path(bundle) / "spec.yaml", manifest.get("overrides", []))
        problems = [source.locate(p) for p in problems]
    except (SpecError, OSError):
        pass  # the bundle's spec no longer loads: the refusals stand unlocated
    problems += edits
    _err("\n".join([f"{len(problems)} job setting{'s' if len(problems) != 1 else ''} "
                    f"refused in {bundle}:", *(p.format() for p in problems)]))
    return EXIT_BAD_INPUT

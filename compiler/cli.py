"""`rlspec`: validate, compile, inspect, submit, status, cancel, schema.

Exit codes: 0 success, 2 invalid spec (every problem listed), 1 any other failure. A user
never sees a traceback for a mistake of theirs: errors are caught here, at the edge.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from compiler import __version__
from compiler.bundle import BundleError, read_manifest, write_bundle
from spec.errors import EXIT_FAILURE, SpecError

app = typer.Typer(
    name="rlspec",
    help="Declarative RL jobs for large MoE models: validate, compile, inspect, submit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SpecArg = Annotated[Path, typer.Argument(help="The spec YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override: dotted.path=value (value parsed as YAML); repeatable."),
]


def _fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", markup=True) if code else None
    return typer.Exit(code)


def _report_spec_error(exc: SpecError) -> typer.Exit:
    err.print(exc.format(), markup=False)
    return typer.Exit(exc.exit_code)


def _warnings(warnings) -> None:
    for w in warnings:
        err.print(w.format(), markup=False, style="yellow")


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec completely (shape, then meaning) without writing anything."""
    from compiler.api import validate as run

    try:
        v = run(spec, set_ or [])
    except SpecError as exc:
        raise _report_spec_error(exc) from None
    _warnings(v.warnings)
    out.print(f"{spec}: valid ({len(v.warnings)} warning{'s' if len(v.warnings) != 1 else ''})")


@app.command("compile")
def compile_(
    spec: SpecArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle directory to write.")],
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an existing (unsubmitted) bundle.")] = False,
) -> None:
    """Compile a spec into a bundle of runnable jobs (written atomically)."""
    from compiler.api import compile_spec

    try:
        compiled = compile_spec(spec, set_ or [])
        write_bundle(compiled.files, output, force=force)
    except SpecError as exc:
        raise _report_spec_error(exc) from None
    except (BundleError, OSError) as exc:
        raise _fail(str(exc)) from None
    _warnings(compiled.validated.warnings)
    jobs = compiled.graph.order()
    out.print(f"wrote {output}: {len(jobs)} jobs ({' → '.join(jobs)}), "
              f"{len(compiled.files)} files")


@app.command()
def inspect(
    target: Annotated[Path, typer.Argument(help="A spec file or a compiled bundle directory.")],
    set_: SetOpt = None,
    graph: Annotated[
        str | None,
        typer.Option("--graph", help="Show the job graph: tree, dot, or png (writes graph.png)."),
    ] = None,
    job: Annotated[str | None, typer.Option("--job", help="Show one job's scripts and config.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable plan.")] = False,
) -> None:
    """Show the plan: derived sizes, budgets, memory, the graph, or one job's files."""
    from compiler import inspect as view
    from compiler.api import compile_spec

    spec_path, overrides = target, list(set_ or [])
    if target.is_dir():
        try:
            manifest = read_manifest(target)
        except BundleError as exc:
            raise _fail(str(exc)) from None
        spec_path, overrides = target / "spec.yaml", manifest["overrides"] + overrides
    try:
        compiled = compile_spec(spec_path, overrides)
    except SpecError as exc:
        raise _report_spec_error(exc) from None

    if job is not None:
        if job not in compiled.graph.jobs:
            raise _fail(f"no job {job!r}; jobs: {', '.join(compiled.graph.order())}")
        view.show_job(out, compiled, job)
    elif graph is not None:
        if graph == "tree":
            view.show_tree(out, compiled)
        elif graph == "dot":
            sys.stdout.write(compiled.files["graph.dot"])
        elif graph == "png":
            dot = shutil.which("dot")
            if dot is None:
                raise _fail("PNG needs Graphviz's `dot` (apt-get install graphviz); "
                            "`--graph dot` prints the DOT text")
            png = Path("graph.png")
            subprocess.run([dot, "-Tpng", "-o", str(png)], input=compiled.files["graph.dot"],
                           text=True, check=True)
            out.print(f"wrote {png}")
        else:
            raise _fail(f"--graph takes tree, dot or png, not {graph!r}")
    elif as_json:
        sys.stdout.write(json.dumps(view.plan_json(compiled), indent=2, sort_keys=True) + "\n")
    else:
        view.show_summary(out, compiled)


@app.command()
def submit(
    bundle: Annotated[Path, typer.Argument(help="A compiled bundle directory.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the requests; send nothing.")] = False,
    force: Annotated[bool, typer.Option(help="Submit a bundle that was submitted before.")] = False,
    local: Annotated[bool, typer.Option("--local", help="Run locally even where Slurm exists.")] = False,
) -> None:
    """Submit a bundle: Slurm (afterok chain) where `srun` exists, else local in graph order."""
    from compiler import submit as sub

    try:
        manifest = read_manifest(bundle)
        if dry_run:  # the request the bundle makes, whatever this machine has
            backend = "local" if local else manifest["scheduler"]
            requests = sub.plan_submission(bundle.resolve(), manifest, backend)
            payload = {"backend": backend, "requests": [r.__dict__ for r in requests]}
            sys.stdout.write(json.dumps(payload, indent=2) + "\n")
            return
        backend = "local" if local else sub.choose_backend(manifest)
        record = sub.submit(bundle, force=force, backend=backend, echo=out.print)
    except BundleError as exc:
        raise _fail(str(exc)) from None
    failed = [n for n, j in record.jobs.items() if j["state"] in ("FAILED", "CANCELLED")]
    if failed:
        raise _fail(f"jobs did not complete: {', '.join(failed)}; see `rlspec status {bundle}`")


@app.command()
def status(bundle: Annotated[Path, typer.Argument(help="A submitted bundle directory.")]) -> None:
    """State of every job of a submitted bundle, with the failed job's log."""
    from compiler import inspect as view
    from compiler import submit as sub

    try:
        read_manifest(bundle)
    except BundleError as exc:
        raise _fail(str(exc)) from None
    record = sub.Submission.load(bundle.resolve())
    if record is None:
        raise _fail(f"{bundle} has not been submitted; `rlspec submit {bundle}`")
    if record.backend == "slurm":
        live = sub.slurm_states([j["id"] for j in record.jobs.values() if j.get("id")])
        for j in record.jobs.values():
            j["state"] = live.get(j["id"], j["state"])
    view.show_status(out, record)


@app.command()
def cancel(bundle: Annotated[Path, typer.Argument(help="A submitted bundle directory.")]) -> None:
    """Cancel every Slurm job of a submitted bundle."""
    from compiler import submit as sub

    try:
        ids = sub.cancel(bundle)
    except BundleError as exc:
        raise _fail(str(exc)) from None
    out.print(f"cancelled {len(ids)} job(s): {' '.join(ids)}")


@app.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editor autocompletion of spec files)."""
    from spec.schema import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def version() -> None:
    """Print rlspec's version."""
    out.print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

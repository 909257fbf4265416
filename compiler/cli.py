"""`rlspec`: validate, compile, inspect, submit, status, cancel, schema.

Exit codes: 0 success, 2 bad input (an invalid spec, every problem listed; a path, bundle
or run directory that cannot be used; a bad option), 1 any other failure. A user never sees
a traceback for a mistake of theirs: errors are caught here, at the edge.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from compiler import __version__
from compiler.bundle import BundleError, BundleInputError, read_manifest
from spec.errors import EXIT_BAD_INPUT, EXIT_FAILURE, SpecError

app = typer.Typer(
    name="rlspec",
    help="Declarative RL jobs for large MoE models: validate, compile, inspect, submit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """rich is imported on first use: validate/compile print plain lines and stay fast."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console = None

    def __getattr__(self, name: str):
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            # Piped output is not cut at 80 columns: files and greps get whole lines.
            width = None if stream.isatty() else 1000
            self._console = Console(stderr=self._stderr, highlight=False, soft_wrap=True,
                                    width=width)
        return getattr(self._console, name)


out = _LazyConsole(stderr=False)
err = _LazyConsole(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="The spec YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override: dotted.path=value (value parsed as YAML); repeatable."),
]


def _fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _last_lines(log: str, lines: int = 20) -> list[str]:
    try:
        with open(log, errors="replace") as f:
            return [line.rstrip("\n") for line in collections.deque(f, maxlen=lines)]
    except OSError:
        return []


def _tail(log: str | None) -> str:
    """The last lines of a failed job's log, and of the logs they point to (the RL job's
    "role 'train' exited with status 1; see …/rl-train.log"): the error, where the command
    failed."""
    if not log:
        return ""
    tails = {log: _last_lines(log)}
    for path in re.findall(r"; see (\S+\.log)\b", "\n".join(tails[log])):
        tails.setdefault(path, _last_lines(path))
    return "".join(f"\nlast lines of {path}:\n" + "\n".join(f"  {t}" for t in text)
                   for path, text in tails.items() if text)


def _report_spec_error(exc: SpecError) -> typer.Exit:
    typer.echo(exc.format(), err=True)
    return typer.Exit(exc.exit_code)


# What `pip install rlspec` leaves out (pyproject.toml extras): the modules each extra brings.
EXTRAS = {
    "runtime": ("torch", "numpy", "transformers", "safetensors", "tqdm", "tensorboard"),
    "report": ("matplotlib",),
}


def _require(extra: str, command: str) -> None:
    """Fail with the install line when ``extra``'s modules are missing from this interpreter
    (the core install is the compiler only)."""
    import importlib.util

    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise _fail(f"`rlspec {command}` needs the {extra} packages (missing: "
                    f"{', '.join(missing)}): pip install 'rlspec[{extra}]'")


def _warnings(warnings) -> None:
    for w in warnings:
        typer.echo(w.format(), err=True)


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec completely (shape, then meaning) without writing anything."""
    from compiler.commands import validate_command

    raise typer.Exit(validate_command(spec, set_ or []))


@app.command("compile")
def compile_(
    spec: SpecArg,
    # a string: Path("") would be ".", and an empty -o is refused, not the cwd
    output: Annotated[str, typer.Option("-o", "--output", help="Bundle directory to write.")],
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an existing (unsubmitted) bundle.")] = False,
) -> None:
    """Compile a spec into a bundle of runnable jobs (written atomically)."""
    from compiler.commands import compile_command

    raise typer.Exit(compile_command(spec, output, set_ or [], force))


@app.command()
def check(bundle: Annotated[Path, typer.Argument(help="A compiled bundle directory.")]) -> None:
    """Run every job's preflight on a written bundle: the start-up checks each job makes
    (its engine's support, its launch flags, the checkpoint's architecture), without
    weights, processes or GPUs. Exit 2 lists each refusal with its spec path and way out."""
    from compiler.commands import check_command

    raise typer.Exit(check_command(bundle))


@app.command()
def inspect(
    target: Annotated[Path, typer.Argument(help="A spec file or a compiled bundle directory.")],
    set_: SetOpt = None,
    graph: Annotated[
        str | None,
        typer.Option("--graph", help="Show the job graph: tree, dot, or png (writes graph.png, "
                     "or the -o path)."),
    ] = None,
    job: Annotated[str | None, typer.Option("--job", help="Show one job's scripts and config.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable plan.")] = False,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Where --graph png writes the image (default graph.png).",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --graph png image.")] = False,
) -> None:
    """Show the plan: derived sizes, budgets, memory, the graph, or one job's files."""
    from compiler import inspect as view
    from compiler.api import compile_spec
    from compiler.inputs import bundle_input_overrides

    if graph not in (None, "tree", "dot", "png"):
        raise _fail(f"--graph takes tree, dot or png, not {graph!r}", EXIT_BAD_INPUT)
    if output is not None and graph != "png":
        raise _fail("-o/--output names the image of --graph png; add --graph png",
                    EXIT_BAD_INPUT)
    png = output or Path("graph.png")
    if graph == "png" and png.exists() and not force:
        raise _fail(f"{png} already exists; pass --force to replace it, or -o another path",
                    EXIT_BAD_INPUT)
    spec_path, overrides = target, list(set_ or [])
    if target.is_dir():
        try:
            manifest = read_manifest(target)
        except BundleError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        spec_path, overrides = target / "spec.yaml", manifest["overrides"] + overrides
    try:  # the plan of a layout the runtime refuses is shown too, the refusals after it
        if target.is_dir():  # its inputs where its compile anchored them
            overrides += bundle_input_overrides(target, overrides)
        compiled = compile_spec(spec_path, overrides, preflight=False)
    except SpecError as exc:
        raise _report_spec_error(exc) from None

    if job is not None:
        if job not in compiled.graph.jobs:
            raise _fail(f"no job {job!r}; jobs: {', '.join(compiled.graph.order())}",
                        EXIT_BAD_INPUT)
        view.show_job(out, compiled, job)
    elif graph is not None:
        if graph == "tree":
            view.show_tree(out, compiled)
        elif graph == "dot":
            sys.stdout.write(compiled.files["graph.dot"])
        else:
            _write_png(compiled.files["graph.dot"], png)
            out.print(f"wrote {png}")
    elif as_json:
        sys.stdout.write(json.dumps(view.plan_json(compiled), indent=2, sort_keys=True) + "\n")
    else:
        view.show_summary(out, compiled)
    if compiled.refusals:
        typer.echo(SpecError(list(compiled.refusals)).format(), err=True)
        raise typer.Exit(EXIT_BAD_INPUT)


def _write_png(dot_text: str, png: Path) -> None:
    """Graphviz's PNG of ``dot_text`` written to ``png`` (replaced whole, never half-written)."""
    dot = shutil.which("dot")
    if dot is None:
        raise _fail("PNG needs Graphviz's `dot` (apt-get install graphviz); "
                    "`--graph dot` prints the DOT text")
    done = subprocess.run([dot, "-Tpng"], input=dot_text.encode(), capture_output=True,
                          check=False)
    if done.returncode != 0:
        raise _fail(f"`dot -Tpng` failed (exit {done.returncode}): "
                    f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    tmp = png.with_name(f".{png.name}.tmp")
    try:
        tmp.write_bytes(done.stdout)
        os.replace(tmp, png)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _fail(f"cannot write {png}: {exc.strerror}; choose a writable path with -o",
                    EXIT_BAD_INPUT) from None


@app.command()
def submit(
    bundle: Annotated[Path, typer.Argument(help="A compiled bundle directory.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the requests; send nothing.")] = False,
    force: Annotated[bool, typer.Option(help="Submit a bundle that was submitted before.")] = False,
    local: Annotated[bool, typer.Option("--local", help="Run the jobs here, in graph order, even for a Slurm spec.")] = False,
) -> None:
    """Submit a bundle: a Slurm spec's jobs to Slurm (afterok chain; `sbatch` and `srun`
    must be on PATH), a local spec's (or with --local) here, in graph order."""
    from compiler import submit as sub

    try:
        manifest = read_manifest(bundle)
        # The backend that would really be used, on this machine (or the same refusal).
        backend = sub.choose_backend(manifest, local=local)
        if dry_run:
            requests = sub.plan_submission(bundle.resolve(), manifest, backend)
            payload = {"backend": backend, "requests": [r.__dict__ for r in requests]}
            sys.stdout.write(json.dumps(payload, indent=2) + "\n")
            return
        record = sub.submit(bundle, force=force, backend=backend, echo=out.print)
    except BundleError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    failed = [n for n, j in record.jobs.items() if j["state"] in ("FAILED", "CANCELLED")]
    if failed:
        raise _fail(f"jobs did not complete: {', '.join(failed)}; see `rlspec status {bundle}`")


@app.command()
def run(
    spec: SpecArg,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Run directory (default cluster.output_dir/<name>, e.g. runs/<name>); "
        "the bundle goes in <out>/bundle.")] = None,
    set_: SetOpt = None,
) -> None:
    """Compile a local spec and run its jobs here, in graph order.

    Running the same command again resumes: finished jobs are skipped and the RL job
    continues from its last complete step.
    """
    from compiler import runner
    from compiler.api import compile_spec

    if "RLSPEC_PYTHON" not in os.environ:  # the jobs run on this interpreter (compiler.submit)
        _require("runtime", "run")
    try:
        compiled = compile_spec(spec, set_ or [])
    except SpecError as exc:
        raise _report_spec_error(exc) from None
    try:
        summary = runner.run_local(compiled, out or runner.default_run_dir(compiled),
                                   echo=typer.echo)
    except BundleError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted: run the same command again to resume", 130) from None
    failed = [n for n, j in summary["jobs"].items() if j["state"] != "COMPLETED"]
    if failed:
        logs = [summary["jobs"][n].get("log") for n in failed]
        raise _fail(f"jobs did not complete: {', '.join(failed)}; logs: "
                    + ", ".join(map(str, logs)) + _tail(next((lg for lg in logs if lg), None)))
    typer.echo(runner.describe(summary))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(
        help="Run directories (`rlspec run --out DIR`); several are drawn on the same axes.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for the plots and report.md (default <first run>/report).")] = None,
    force: Annotated[bool, typer.Option(
        help="Write into a folder that holds other files than an earlier report.")] = False,
) -> None:
    """PNG plots (reward and accuracy, zero-variance rate, rollout accounting, train–inference
    gap per replay mode) and a markdown summary of one or more runs."""
    from compiler.report import ReportError, write_report

    _require("report", "report")
    try:
        folder = write_report(runs, out, force=force)
    except ReportError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    typer.echo(f"wrote {folder / 'report.md'} and its plots")


@app.command()
def status(bundle: Annotated[Path, typer.Argument(help="A submitted bundle directory.")]) -> None:
    """State of every job of a submitted bundle, with the failed job's log."""
    from compiler import inspect as view
    from compiler import submit as sub

    problems: list[str] = []
    try:
        read_manifest(bundle)
        record = sub.Submission.load(bundle.resolve())
        if record is None:
            raise BundleInputError(f"{bundle} has not been submitted; `rlspec submit {bundle}`")
        if record.backend == "slurm":
            live, problems = sub.slurm_states(
                [j["id"] for j in record.jobs.values() if j.get("id")])
            for j in record.jobs.values():
                j["state"] = live.get(j["id"], j["state"])
    except BundleError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    if problems:  # the table then shows the last recorded states
        typer.echo(f"warning: {'; '.join(problems)}; a job Slurm did not report shows its "
                   "last recorded state", err=True)
    view.show_status(out, record)


@app.command()
def cancel(bundle: Annotated[Path, typer.Argument(help="A submitted bundle directory.")]) -> None:
    """Cancel every Slurm job of a submitted bundle."""
    from compiler import submit as sub

    try:
        ids = sub.cancel(bundle)
    except BundleError as exc:  # CancelFailed (1): the jobs scancel did not cancel
        raise _fail(str(exc), exc.exit_code) from None
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

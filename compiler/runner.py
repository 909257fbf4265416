"""`rlspec run`: compile, then execute the bundle's jobs on this machine, in graph order.

The run directory holds the bundle (`<out>/bundle`) and everything the jobs write
(`<out>/artifacts`, `<out>/logs`, `<out>/checkpoints`); at the end `<out>/summary.json`,
`<out>/metrics.jsonl` (one line per RL step) and `<out>/tensorboard` are put at its top.
On a terminal a progress bar follows the RL job's steps. Running again resumes: the bundle of
the same spec is reused, jobs whose outputs are complete skip, and the RL job continues from
its saved state. A run directory made from a different spec is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compiler.api import Compiled
from compiler.bundle import BundleInputError, read_manifest, write_bundle
from compiler.submit import submit


def prepare_bundle(compiled: Compiled, out: Path) -> Path:
    """``out/bundle``: written on a new or empty ``out``, reused where ``out`` holds a run of
    the same spec; a folder of other files is refused (the run writes and replaces
    ``summary.json``, ``metrics.jsonl``, ``tensorboard/`` ... at its top)."""
    bundle = out / "bundle"
    new = json.loads(compiled.files["manifest.json"])
    if not bundle.exists() and out.is_dir() and any(out.iterdir()):
        raise BundleInputError(
            f"{out} holds files and no rlspec run (no {bundle}): a run would write over them; "
            "choose a new or empty --out")
    if bundle.exists():
        old = read_manifest(bundle)
        if old["spec_sha256"] != new["spec_sha256"] or old["rlspec_version"] != new["rlspec_version"]:
            raise BundleInputError(
                f"{out} holds a run of another spec (or rlspec version); "
                "choose another --out, or remove it to start over")
        return bundle
    return write_bundle(compiled.files, bundle)


def default_run_dir(compiled: Compiled) -> Path:
    """Where `rlspec run` writes without --out: cluster.output_dir/<name>, as a bundle's
    env.sh does (a relative output_dir is taken from the current directory)."""
    spec = compiled.validated.source.spec
    return Path(spec.cluster.output_dir) / spec.name


def run_local(compiled: Compiled, out: Path, *, echo: Any = print) -> dict[str, Any]:
    spec = compiled.validated.source.spec
    if spec.cluster.scheduler != "local":
        raise BundleInputError(
            f"`rlspec run` executes on this machine; {spec.name} is a "
            f"{spec.cluster.scheduler} spec: use `rlspec compile` + `rlspec submit`")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bundle = prepare_bundle(compiled, out)
    os.environ["RLSPEC_RUN_DIR"] = str(out)
    with stop_on_sigterm(), rl_progress(out / "artifacts" / "rl" / "metrics.jsonl", spec.train.steps):
        record = submit(bundle, force=True, backend="local", echo=echo)
    summary = collect_summary(out)
    summary["jobs"] = record.jobs
    publish(out)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM ends `rlspec run` like Ctrl-C does: the running job is stopped, not orphaned."""
    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def publish(out: Path) -> None:
    """Copy the RL job's metrics.jsonl and TensorBoard events to the top of the run dir."""
    rl = out / "artifacts" / "rl"
    if (rl / "metrics.jsonl").is_file():
        shutil.copy2(rl / "metrics.jsonl", out / ".metrics.jsonl.tmp")
        os.replace(out / ".metrics.jsonl.tmp", out / "metrics.jsonl")
    if (rl / "tensorboard").is_dir():
        tmp = out / ".tensorboard.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(rl / "tensorboard", tmp)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
        os.replace(tmp, out / "tensorboard")


@contextmanager
def rl_progress(metrics: Path, total: int, *, stream: Any = None,
                interval_s: float = 0.5) -> Iterator[None]:
    """A tqdm bar of RL steps (lines of ``metrics``) while the body runs, on a terminal only:
    the jobs' own output goes to their logs, so this is the one live view of a local run."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield
        return
    from tqdm import tqdm

    stop = threading.Event()

    def follow() -> None:
        bar = None
        while not stop.wait(interval_s):
            if not metrics.is_file():
                continue
            lines = metrics.read_text(encoding="utf-8").splitlines()
            if bar is None:
                bar = tqdm(total=total, desc="rl", unit="step", file=stream, leave=True)
            bar.n = len(lines)
            if lines:
                try:
                    last = json.loads(lines[-1])
                except ValueError:  # a line being appended
                    continue
                bar.set_postfix(reward=f"{last.get('reward_mean') or 0:.3f}",
                                zero_var=f"{last.get('zero_variance_rate') or 0:.2f}",
                                refresh=False)
            bar.refresh()
        if bar is not None:
            bar.close()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect_summary(out: Path) -> dict[str, Any]:
    """The run's summary: the RL job's accounting plus held-out accuracy before and after."""
    art = out / "artifacts"
    summary = dict(_read(art / "rl" / "summary.json"))
    for when in ("before", "after"):
        metrics = _read(art / f"eval_{when}" / "metrics.json")
        summary[f"eval_accuracy_{when}"] = metrics.get("accuracy")
    return summary


def describe(summary: dict[str, Any]) -> str:
    def pct(x: Any) -> str:
        return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"

    generated = summary.get("rollouts_generated") or 0
    wasted = summary.get("rollouts_wasted") or 0
    share = f" ({100 * wasted / generated:.1f}%)" if generated else ""
    reshaped = summary.get("rollouts_reshaped") or 0
    return (f"held-out accuracy {pct(summary.get('eval_accuracy_before'))} → "
            f"{pct(summary.get('eval_accuracy_after'))}; rollouts generated {generated}, "
            f"wasted {wasted}{share}, reshaped by RL-ZVP {reshaped}; "
            f"RL wall time {summary.get('wall_seconds', 0):.0f} s")

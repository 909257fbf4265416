"""`rlspec run`: compile, then execute the bundle's jobs on this machine, in graph order.

The run directory holds the bundle (`<out>/bundle`) and everything the jobs write
(`<out>/artifacts`, `<out>/logs`, `<out>/checkpoints`). Running again resumes: the bundle of
the same spec is reused, jobs whose outputs are complete skip, and the RL job continues from
its saved state. A run directory made from a different spec is never overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compiler.api import Compiled
from compiler.bundle import BundleError, read_manifest, write_bundle
from compiler.submit import submit


def prepare_bundle(compiled: Compiled, out: Path) -> Path:
    bundle = out / "bundle"
    new = json.loads(compiled.files["manifest.json"])
    if bundle.exists():
        old = read_manifest(bundle)
        if old["spec_sha256"] != new["spec_sha256"] or old["rlspec_version"] != new["rlspec_version"]:
            raise BundleError(
                f"{out} holds a run of another spec (or rlspec version); "
                "choose another --out, or remove it to start over")
        return bundle
    return write_bundle(compiled.files, bundle)


def run_local(compiled: Compiled, out: Path, *, echo: Any = print) -> dict[str, Any]:
    spec = compiled.validated.source.spec
    if spec.cluster.scheduler != "local":
        raise BundleError(f"`rlspec run` executes on this machine; {spec.name} is a "
                          f"{spec.cluster.scheduler} spec: use `rlspec compile` + `rlspec submit`")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bundle = prepare_bundle(compiled, out)
    os.environ["RLSPEC_RUN_DIR"] = str(out)
    record = submit(bundle, force=True, backend="local", echo=echo)
    summary = collect_summary(out)
    summary["jobs"] = record.jobs
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary


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
    return (f"held-out accuracy {pct(summary.get('eval_accuracy_before'))} → "
            f"{pct(summary.get('eval_accuracy_after'))}; rollouts generated {generated}, "
            f"wasted {wasted}{share}; RL wall time {summary.get('wall_seconds', 0):.0f} s")

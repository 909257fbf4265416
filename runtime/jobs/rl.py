"""Job ``rl``: the RL driver (rewards, ZVE filters, advantages, accounting); see ``runtime.driver``.

``jobs/rl/launch.sh`` starts the rollout engine(s) and the trainer in the background and
runs this driver in the foreground. The driver talks to the engines over HTTP
(``RLSPEC_ROLLOUT_ENDPOINTS``) and to the
trainer through files under ``artifacts/rl/exchange``. At the end it writes the outputs:

    policy_final   the last weights (HF folder, atomic, ``.complete``)
    rl_metrics     artifacts/rl: metrics.jsonl (one line per step), summary.json
                   {eval_accuracy_before, rollouts_generated, rollouts_wasted,
                   rollouts_reshaped, rollouts_zero_variance, wall_seconds, steps, ...},
                   ledger.json,
                   tensorboard/ (when TensorBoard is installed)

A restart resumes after the last complete step (``runtime.driver`` module doc).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.jobs.common import (
    COMPLETE_MARKER,
    JobContext,
    JobError,
    atomic_write_json,
    link_tree,
    run_job,
)


def _eval_accuracy_before(ctx: JobContext) -> float | None:
    """Accuracy written by the eval_before job (runtime.jobs.evaluate), if it ran first.

    eval_before and rl are siblings in the graph (both follow the policy), so under Slurm
    this may not exist yet; the run's final summary is completed after eval_after.
    """
    path = ctx.run_dir / "artifacts" / "eval_before" / "metrics.json"
    if not path.is_file():
        return None
    return float(json.loads(path.read_text(encoding="utf-8"))["accuracy"])


def _wait_trainer_finished(ctx: JobContext, paths: Any, timeout_s: float = 300.0) -> None:
    """The trainer writes ``trainer-finished.json`` after its final checkpoint."""
    deadline = time.monotonic() + timeout_s
    while not paths.trainer_finished.is_file():
        if paths.trainer_error.is_file() or time.monotonic() > deadline:
            raise JobError("the trainer did not finish its final checkpoint "
                           f"(log: {ctx.run_dir / 'logs' / 'rl-train.log'})")
        time.sleep(0.1)


def run(ctx: JobContext) -> None:
    from runtime.driver import RLDriver
    from runtime.processes import die_with_parent, rollout_endpoints
    from runtime.rollout.client import RolloutClient

    die_with_parent()
    endpoints = rollout_endpoints()
    ctx.log.info("rollout endpoints: %s", ", ".join(endpoints))
    client = RolloutClient(endpoints, timeout_s=ctx.rollout_timeout_s,
                           max_num_seqs=ctx.engine_concurrency(),
                           stall_s=ctx.rollout_timeout_s, on_stall=ctx.engine_stalled)
    try:
        driver = RLDriver(ctx, client=client)
        summary = driver.run()
    finally:
        client.close()
    paths = driver.paths
    _wait_trainer_finished(ctx, paths)
    steps = int(summary["steps"])
    final = paths.version(steps) if steps else ctx.input_of_kind("hf_checkpoint")
    with ctx.atomic_output("policy_final", steps=steps) as tmp:
        if steps:  # links, not a copy (the weights folder goes when rl_metrics replaces
            link_tree(final, tmp)  # artifacts/rl)
        else:  # the starting checkpoint, maybe the user's own: a copy
            shutil.copytree(final, tmp, dirs_exist_ok=True)
        (tmp / COMPLETE_MARKER).unlink(missing_ok=True)  # the output gets its own
    summary["eval_accuracy_before"] = _eval_accuracy_before(ctx)
    ledger = summary.pop("ledger")
    with ctx.atomic_output("rl_metrics", steps=steps) as tmp:
        shutil.copy2(paths.metrics, tmp / "metrics.jsonl")
        if (paths.root / "tensorboard").is_dir():
            shutil.copytree(paths.root / "tensorboard", tmp / "tensorboard")
        atomic_write_json(Path(tmp) / "summary.json", summary)
        atomic_write_json(Path(tmp) / "ledger.json", ledger)
    ctx.log.info("RL done: %d steps, %d rollouts (%d wasted, %d reshaped by RL-ZVP, "
                 "%d zero-variance) in %.1f s", steps, summary["rollouts_generated"],
                 summary["rollouts_wasted"], summary["rollouts_reshaped"],
                 summary["rollouts_zero_variance"], summary["wall_seconds"])


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

"""The RL run's log: one metrics line per finished step, to ``metrics.jsonl`` and TensorBoard.

``metrics.jsonl`` gets one JSON line per step, appended and fsynced (a restart truncates it
to the steps its state counts, ``runtime.driver``); TensorBoard (when installed) gets every
number of the line as ``rl/<key>``, the clip fractions per entropy group and each replica's
idle fraction; the terminal gets a tqdm bar, or a log line per step when stderr is not one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "replica_metrics"]


class RunLog:
    """Appends each finished step's metrics line (module doc)."""

    def __init__(self, metrics: Path, tensorboard: Path, total: int, start: int,
                 log: Any) -> None:
        self.metrics = metrics
        self.writer = _tensorboard(tensorboard, log)
        self.bar = _progress(total, start)

    def write(self, line: dict[str, Any]) -> None:
        step = int(line["step"])
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self.writer is not None:
            for key, value in line.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"rl/{key}", value, step)
            for key, value in line["clip_fraction"].items():
                self.writer.add_scalar(f"rl/clip_fraction/{key}", value, step)
            for r, value in enumerate(line["replica_idle_fraction"]):
                self.writer.add_scalar(f"rl/replica_idle_fraction/{r}", value, step)
            self.writer.flush()
        self.bar(line)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def replica_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """The metrics line's rollout-replica keys from one step's generation ``stats``:
    ``generation_seconds``, and per replica (endpoint order) ``replica_busy_seconds`` and
    ``replica_idle_fraction`` (``runtime.rollout.replica_time``)."""
    from runtime.rollout.replica_time import idle_fraction

    wall = float(stats["seconds"])
    busy = [float(b) for b in stats.get("replica_busy", [])]
    return {"generation_seconds": wall, "replica_busy_seconds": busy,
            "replica_idle_fraction": [idle_fraction(b, wall) for b in busy]}


def _tensorboard(folder: Path, log: Any) -> Any:
    """A TensorBoard writer into ``folder``; None (metrics.jsonl only) when the tensorboard
    package is not installed. Any other error (a broken install, a failing dependency of
    torch's writer) propagates."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "tensorboard":
            raise
        log.warning("no TensorBoard events (%s): metrics.jsonl only",
                    " ".join(str(exc).split()))
        return None
    return SummaryWriter(str(folder))


def _progress(total: int, start: int) -> Callable[[dict[str, Any]], None]:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else a log line per step."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        bar = tqdm(total=total, initial=start, desc="rl", unit="step")

        def update(line: dict[str, Any]) -> None:
            bar.set_postfix(reward=line["reward_mean"], zv=line["zero_variance_rate"])
            bar.update(1)
        return update

    def log_line(line: dict[str, Any]) -> None:
        def num(key: str, fmt: str) -> str:
            value = line.get(key)
            return "n/a" if value is None else format(value, fmt)

        print(f"[rlspec {time.strftime('%H:%M:%S', time.gmtime())}] rl: step {line['step'] + 1}/"
              f"{total}: reward {num('reward_mean', '.3f')}, accuracy "
              f"{num('train_accuracy', '.3f')}, zero-variance {num('zero_variance_rate', '.2f')}, "
              f"{line['rollouts_generated']} rollouts, {num('tokens_per_second', '.0f')} tok/s, "
              f"{line['wall_seconds']:.1f} s", file=sys.stderr, flush=True)
    return log_line

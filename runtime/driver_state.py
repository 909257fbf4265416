"""The RL driver's state: what it needs to continue after a restart, saved atomically.

Saved after every step the driver hands over and after every step the trainer finishes;
the pickle holds the filter pipeline (stages, ledger), the prompt stream (position, RNG),
the length predictor, the run's totals and the steps handed over but not finished
(``Pending``: their batch files stay in the exchange folder and are trained after a
restart, so no prompt is lost or drawn twice).
"""

from __future__ import annotations

import os
import pickle
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DriverState", "Pending", "load_state", "save_state"]


@dataclass
class Pending:
    """A step whose batch is written and not yet trained: the metrics known at hand-over."""

    step: int
    batch_id: str
    last: bool
    line: dict[str, Any]  # the metrics line's rollout half (rewards, ledger, staleness)
    judged: dict[str, int] = field(default_factory=dict)




@dataclass
class DriverState:
    """Everything the driver needs to continue after the last finished step."""

    step: int = 0  # next step to finish (trained and logged)
    next_batch: int = 0  # next step to generate: step + len(pending)
    version: int = 0  # the weights the engines hold: v<version>
    pending: list[Pending] = field(default_factory=list)
    by_staleness: dict[int, int] = field(default_factory=dict)  # rollouts per staleness
    pipeline: Any = None
    stream: Any = None
    metrics_lines: int = 0
    optimizer_steps: int = 0
    wall_seconds: float = 0.0
    numpy_rng: Any = None
    lengths: Any = None  # LengthPredictor: per-prompt generation lengths, for balancing
    extra: dict[str, Any] = field(default_factory=dict)

    def __setstate__(self, saved: dict[str, Any]) -> None:
        """A state pickled by an older driver lacks the newer fields: their defaults."""
        fresh = DriverState().__dict__
        fresh.update(saved)
        if "next_batch" not in saved:  # synchronous: nothing was pending
            fresh["next_batch"] = fresh["version"] = fresh["step"]
        self.__dict__.update(fresh)


def save_state(path: Path, state: DriverState) -> None:
    """Pickle ``state`` to ``path`` atomically (a partial file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        pickle.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> DriverState | None:
    """The saved state, or None before the first save."""
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return pickle.load(fh)

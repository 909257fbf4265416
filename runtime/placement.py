"""Placement of the rollout engines: on nodes of their own, or on the trainer's GPUs.

``rollout.placement: disaggregated`` (the default): the engines keep their memory; a new
policy version is loaded with one push (pause → load → resume).

``rollout.placement: colocated``: trainer and engines share the same GPUs (verl's hybrid
engine, NeMo-RL's and slime's ``--colocate``). The engines give the GPUs to the trainer for
its step and take them back for the next generation, through vLLM's sleep mode (served
with ``--enable-sleep-mode``; ``runtime.rollout.sleeping`` on the embedded engine):

    generate step s → sleep(level 2) → hand batch s to the trainer → trainer steps →
    wake_up(weights) → load v<s+1> → wake_up(kv_cache) → generate step s+1

With ``system.weight_sync: ipc`` the load maps the trainer's shared tensors instead of
reading its folder (``runtime.rollout.weight_transfer.IPCWeightTransfer``).

Level 2 discards the weights instead of offloading them to host memory (level 1): they are
replaced by v<s+1> anyway, so copying them out and back would be wasted bandwidth. The
weights wake first and the KV cache only after the load, so that the load never needs the
weights, the new tensors and the KV cache at once (vLLM's RLHF recipe). The engines sleep
before the batch is written, so the trainer never steps while they hold memory; a run
resumed with a batch handed over puts them to sleep before it is trained.

Colocation is synchronous (the compiler refuses ``system.max_staleness`` > 0 with it: the
engines cannot generate while they sleep).
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["Placement"]


class Placement:
    """The engines' side of the trainer's step, for ``rollout.placement`` (module doc).

    ``seconds`` accumulates the time spent in sleep and wake-up calls since the last
    ``take_seconds`` (the metrics line's ``sleep_wake_seconds``)."""

    def __init__(self, spec: dict[str, Any], client: Any, weight_transfer: Any) -> None:
        self.colocated = spec["rollout"]["placement"] == "colocated"
        self.client = client
        self.weight_transfer = weight_transfer
        self.seconds = 0.0

    def release(self) -> None:
        """Before the trainer steps: colocated engines sleep (level 2), freeing the GPUs."""
        if self.colocated:
            t0 = time.monotonic()
            self.client.sleep(level=2)
            self.seconds += time.monotonic() - t0

    def load(self, version: str, path: str) -> None:
        """After the trainer's step: the engines serve ``version`` (the folder ``path``);
        colocated engines wake their weights, load, then wake their KV cache."""
        if not self.colocated:
            self.weight_transfer.push(self.client, version, path=path)
            return
        t0 = time.monotonic()
        self.client.wake_up(["weights"])
        self.seconds += time.monotonic() - t0
        # Asleep engines are paused already: no pause / resume around the load.
        self.weight_transfer.push(self.client, version, path=path, pause_mode=None)
        t0 = time.monotonic()
        self.client.wake_up(["kv_cache"])
        self.seconds += time.monotonic() - t0

    def take_seconds(self) -> float | None:
        """Sleep and wake-up time since the last call (None when not colocated)."""
        if not self.colocated:
            return None
        seconds, self.seconds = self.seconds, 0.0
        return seconds

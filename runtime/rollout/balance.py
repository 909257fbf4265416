"""Which rollout replica generates which prompt group: longest-processing-time-first (LPT).

Rule: take the groups in decreasing predicted work (ties: in request order) and give each
to the replica with the least predicted work so far (ties: the lowest replica index).

What it guarantees (Graham, 1969): the busiest replica's predicted work is at most
4/3 − 1/(3·replicas) times that of the best possible assignment, and exceeds the least busy
replica's by at most the largest single group's work (the busiest replica was the least
busy one when it received its last group). The RL driver uses it with
``system.length_balancing`` (work: n × predicted length + prompt length, see
``runtime.rollout.length_predictor``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["lpt_assign", "replica_loads"]


def lpt_assign(work: Sequence[float], replicas: int) -> list[int]:
    """The replica (0 … replicas − 1) of each item of ``work``, by the rule above."""
    if replicas < 1:
        raise ValueError(f"need at least one replica, got {replicas}")
    loads = [0.0] * replicas
    owner = [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        r = min(range(replicas), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += work[i]
    return owner


def replica_loads(work: Sequence[float], owner: Sequence[int], replicas: int) -> list[float]:
    """Each replica's total work under the assignment ``owner``."""
    loads = [0.0] * replicas
    for w, r in zip(work, owner, strict=True):
        loads[r] += w
    return loads

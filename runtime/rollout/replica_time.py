"""Busy time and idle fraction of the rollout replicas, from the driver's request events.

Rule: a replica is busy while at least one of the driver's requests to it is in flight,
so its busy time is the length of the union of its requests' (start, finish) intervals
(the client reports one per HTTP completion request, failed attempts included); over a
generation phase of wall time W, its idle fraction is 1 − busy / W, clipped to [0, 1].
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

__all__ = ["RequestLog", "busy_seconds", "idle_fraction"]


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of the (start, finish) intervals."""
    total, end = 0.0, float("-inf")
    for start, finish in sorted(intervals):
        if finish <= end:
            continue
        total += finish - max(start, end)
        end = finish
    return total


def idle_fraction(busy: float, wall: float) -> float:
    """1 − busy / wall in [0, 1]; 0 when nothing was timed."""
    if wall <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - busy / wall))


class RequestLog:
    """The ``on_request(endpoint, start, finish)`` callback of ``RolloutClient.generate``:
    records every request's interval (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[str, float, float]] = []

    def __call__(self, endpoint: str, start: float, finish: float) -> None:
        with self._lock:
            self.events.append((endpoint, start, finish))

    def busy(self, endpoints: Sequence[str]) -> list[float]:
        """Busy seconds of each endpoint, in the order given."""
        with self._lock:
            events = list(self.events)
        return [busy_seconds((s, f) for e, s, f in events if e == endpoint)
                for endpoint in endpoints]

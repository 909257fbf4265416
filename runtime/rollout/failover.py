"""Which rollout endpoint a request goes to when one fails: health-aware failover.

A request first goes where it was planned (round-robin, or the replica the driver's length
balancing chose). An endpoint whose request fails with a transport error or a 5xx is marked
*down* for ``down_s`` seconds; while down, requests planned for it go elsewhere at once, so a
dead replica costs one failed attempt per cool-down, not one per request. A retry, and a
request planned for a down endpoint, goes to the up endpoint with the fewest requests in
flight (ties: the next one after the planned endpoint, in order), never to one this request
has already tried while another is left. Any answer from an endpoint (a success or a 4xx,
which is the request's fault) marks it up again; after the cool-down a down endpoint gets its
planned requests back, which probes it.

This is what the routers in front of SGLang / vLLM fleets do (slime's and AReaL's): round-robin
retries would pile a dead replica's whole share onto its neighbour while the others idle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["EndpointHealth"]


class EndpointHealth:
    """In-flight counts and down marks of ``n`` endpoints (indices); thread-safe."""

    def __init__(self, n: int, *, down_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if n < 1 or down_s < 0:
            raise ValueError("need at least one endpoint and down_s ≥ 0")
        self.n, self.down_s, self._clock = n, float(down_s), clock
        self._in_flight = [0] * n
        self._down_until = [float("-inf")] * n
        self._lock = threading.Lock()

    def is_down(self, i: int) -> bool:
        with self._lock:
            return self._clock() < self._down_until[i]

    def pick(self, planned: int, tried: set[int] | frozenset[int] = frozenset()) -> int:
        """The endpoint for the next attempt of a request planned for ``planned`` that has
        already tried ``tried`` (module doc)."""
        with self._lock:
            return self._pick(planned, tried)

    def _pick(self, planned: int, tried: set[int] | frozenset[int]) -> int:
        now = self._clock()
        fresh = [i for i in range(self.n) if i not in tried] or list(range(self.n))
        up = [i for i in fresh if now >= self._down_until[i]]
        if planned in up:
            return planned
        if not up:  # every fresh endpoint down: the one whose cool-down ends first
            return min(fresh, key=lambda i: (self._down_until[i], (i - planned) % self.n))
        return min(up, key=lambda i: (self._in_flight[i], (i - planned) % self.n))

    @contextmanager
    def attempt(self, planned: int,
                tried: set[int] | frozenset[int] = frozenset()) -> Iterator[int]:
        """Pick the endpoint (:meth:`pick`) and count the request in flight there, in one
        step, so that concurrent failovers spread; yields it, uncounted after the block."""
        with self._lock:
            i = self._pick(planned, tried)
            self._in_flight[i] += 1
        try:
            yield i
        finally:
            with self._lock:
                self._in_flight[i] -= 1

    def answered(self, i: int) -> None:
        """``i`` answered (success or a client error): it is up."""
        with self._lock:
            self._down_until[i] = float("-inf")

    def failed(self, i: int) -> None:
        """``i`` failed (transport error or 5xx): down for ``down_s`` seconds."""
        with self._lock:
            self._down_until[i] = self._clock() + self.down_s

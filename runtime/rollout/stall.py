"""Noticing a hung engine while long completion requests wait on it.

A request's limit (``runtime.rollout.request_time``) bounds the work it asks for: hours, at
the lengths of reasoning RL. An engine that stops making progress (a hung collective, a
wedged worker) must be noticed sooner than that. vLLM counts, per engine core (the ``engine``
label of its Prometheus samples on ``/metrics``: one per data-parallel rank), the tokens it
has generated (the counter ``vllm:generation_tokens_total``) and the requests it is running
(the gauge ``vllm:num_requests_running``). While an endpoint has requests in flight,
``StallWatch`` reads them every ``poll_s`` seconds::

    stalled  ⇔  some engine core's counter has not moved for stall_s seconds
                while it was running requests all that time,
                or the sum of the counters has not, while the endpoint had requests in
                flight all that time (the rule without the gauge, as on the embedded server)

so one hung data-parallel rank is noticed while the others still decode (vLLM data
parallelism without expert parallelism; with it the ranks step together), and so is an
engine hung in its first step after idling (vLLM updates the gauge when a step ends, so such
a core still reports 0 running). A stalled endpoint's requests in flight are cut (their
connections shut down), so that they fail at once as transport errors: the client marks the
endpoint down and retries them elsewhere
(``runtime.rollout.failover``); which of them waited on the hung core cannot be told, and
the replica is broken either way. An endpoint cut as stalled stays judged: when it is busy
again and a core that hung still stands where it stood at the cut, its new requests are cut
at the first reading, not after another ``stall_s``. The embedded server keeps the counter
(one core, no gauge).

What it cannot see: an endpoint whose ``/metrics`` has no such counter (a vLLM started with
``--disable-log-stats``) or cannot be read (an API server whose event loop is stuck) is never
judged, only its requests' limits apply; nor one data-parallel core hung in its first step
while its siblings decode. An engine paused with ``mode=keep`` for longer than
``stall_s`` with requests in flight would be cut; the driver never generates while it
pauses.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["StallWatch", "Stalled", "engine_readings", "generated_tokens"]

log = logging.getLogger(__name__)
_SAMPLE = re.compile(r"^vllm:(generation_tokens_total|num_requests_running)(?:\{([^}]*)\})?"
                     r"\s+([0-9.eE+-]+)", re.M)
_ENGINE = re.compile(r'(?:^|,)\s*engine="([^"]*)"')
_ALL = "*"  # the pseudo-core of all a replica's cores


def engine_readings(metrics: str) -> dict[str, tuple[float, float | None]]:
    """Per engine core (its ``engine`` label; "" without one): the generated-token counter
    and the running-requests gauge (None when absent) of a ``/metrics`` text; only the cores
    that have the counter."""
    found: dict[str, dict[str, float]] = {}
    for name, labels, value in _SAMPLE.findall(metrics):
        engine = _ENGINE.search(labels or "")
        core = found.setdefault(engine.group(1) if engine else "", {})
        core[name] = core.get(name, 0.0) + float(value)
    return {e: (v["generation_tokens_total"], v.get("num_requests_running"))
            for e, v in found.items() if "generation_tokens_total" in v}


def generated_tokens(metrics: str) -> float | None:
    """The tokens all engine cores of a ``/metrics`` text have generated, or None when it has
    no ``vllm:generation_tokens_total``."""
    readings = engine_readings(metrics)
    return sum(tokens for tokens, _ in readings.values()) if readings else None


class Stalled(Exception):
    """A request cut because its endpoint stopped generating."""


class _Busy:
    """An endpoint with requests in flight: its connections, and per engine core its counter
    and since when it stands there (while it had work)."""

    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.cores: dict[str, tuple[float, float]] = {}  # core → (tokens, since)


class StallWatch:
    """Cuts the requests in flight on an endpoint whose generated-token counter stands still
    for ``stall_s`` (module doc). ``read_metrics(endpoint)`` returns the endpoint's
    ``/metrics`` text (None when it cannot be read); ``on_stall(endpoint, seconds)`` is told
    before the cut."""

    def __init__(self, read_metrics: Callable[[str], str | None], *, stall_s: float,
                 poll_s: float | None = None,
                 on_stall: Callable[[str, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stall_s <= 0:
            raise ValueError("stall_s > 0 required")
        self.stall_s = float(stall_s)
        self.poll_s = float(poll_s if poll_s is not None else min(60.0, stall_s / 4))
        self._read, self._on_stall, self._clock = read_metrics, on_stall, clock
        self._busy: dict[str, _Busy] = {}
        self._stalled: dict[str, dict[str, float]] = {}  # endpoint → hung cores' counters
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.cut: set[int] = set()  # id() of the connections cut, for the caller's message

    def watch(self, endpoint: str, connection: Any) -> None:
        """``connection`` (an ``http.client.HTTPConnection``) waits on ``endpoint``."""
        with self._lock:
            busy = self._busy.setdefault(endpoint, _Busy())
            busy.connections.add(connection)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="stall-watch",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def done(self, endpoint: str, connection: Any) -> bool:
        """``connection`` no longer waits; whether it was cut as stalled."""
        with self._lock:
            busy = self._busy.get(endpoint)
            if busy is not None:
                busy.connections.discard(connection)
                if not busy.connections:  # idle: a still counter means nothing
                    del self._busy[endpoint]
            was_cut = id(connection) in self.cut
            self.cut.discard(id(connection))
            return was_cut

    def post(self, endpoint: str, path: str, data: bytes, timeout: float) -> tuple[int, bytes]:
        """POST ``data`` (JSON) to ``endpoint + path`` directly (no proxy), watched while it
        waits: (status, body). A cut request raises ``Stalled``; a transport failure, OSError
        or ``http.client.HTTPException``."""
        url = urlsplit(endpoint)
        if url.scheme != "http":
            raise ValueError(f"{endpoint}: the stall watch speaks plain HTTP to the engines")
        connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
        self.watch(endpoint, connection)
        try:
            connection.request("POST", url.path.rstrip("/") + path, body=data,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            if self.done(endpoint, connection):
                raise Stalled(f"{endpoint} generated no token for {self.stall_s:g} s with "
                              "requests in flight: cut as hung") from None
            raise
        finally:
            self.done(endpoint, connection)
            connection.close()

    def close(self) -> None:
        """Stop watching, and cut every request still waiting: a job that fails or ends
        must not wait at exit for answers it will not read (they may take hours)."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            waiting = [c for busy in self._busy.values() for c in busy.connections]
        for connection in waiting:
            _shut(connection)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._busy and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                endpoints = list(self._busy)
            for endpoint in endpoints:
                try:
                    self._look(endpoint)
                except Exception:  # a bad reading must not end the watch for the run
                    log.warning("stall watch: %s could not be judged", endpoint, exc_info=True)
            with self._lock:
                if not self._closed:
                    self._wake.wait(self.poll_s)

    def _look(self, endpoint: str) -> None:
        text = self._read(endpoint)
        readings = None if text is None else engine_readings(text)
        if readings and any(running is not None for _, running in readings.values()):
            # the floor: all cores together, judged while the endpoint has requests in
            # flight (a core hung in its first step still reports running 0)
            readings[_ALL] = (sum(tokens for tokens, _ in readings.values()), None)
        now = self._clock()
        with self._lock:
            busy = self._busy.get(endpoint)
            if busy is None or not readings:
                return
            hung = self._hung(endpoint, busy, readings, now)
            if hung is None:
                return
            stalled = list(busy.connections)
            self.cut.update(id(c) for c in stalled)
        if self._on_stall is not None:
            self._on_stall(endpoint, hung)
        for connection in stalled:
            _shut(connection)

    def _hung(self, endpoint: str, busy: _Busy, readings: dict[str, tuple[float, float | None]],
              now: float) -> float | None:
        """How long the longest-standing core of a busy endpoint has stood still with work,
        when that makes it hung (module doc); None otherwise. Under the lock."""
        judged = self._stalled.get(endpoint, {})
        worst: float | None = None
        hung: dict[str, float] = {}
        for core, (tokens, running) in readings.items():
            if running is not None and running <= 0:  # idle: a still counter means nothing
                busy.cores.pop(core, None)
                continue
            seen = busy.cores.get(core)
            if seen is None and judged.get(core) == tokens:
                # still where it stood when it was cut: hung still. Not recorded, so each
                # reading cuts again (a request not yet connected at a cut escapes it).
                hung[core], worst = tokens, max(worst or 0.0, self.stall_s)
            elif seen is None or seen[0] != tokens:
                busy.cores[core] = (tokens, now)
            elif now - seen[1] >= self.stall_s:
                hung[core], worst = tokens, max(worst or 0.0, now - seen[1])
        if worst is None:
            self._stalled.pop(endpoint, None)
            return None
        self._stalled[endpoint] = hung
        return worst


def _shut(connection: Any) -> None:
    """Shut a waiting connection's socket down: its blocked read returns at once."""
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

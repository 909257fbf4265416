"""Pausing the embedded engine between two tokens, as vLLM's ``/pause`` does.

Pausing mirrors vLLM's ``/pause`` modes: ``abort`` ends in-flight generations with
``finish_reason="abort"``, ``wait`` lets them finish, ``keep`` freezes them between
two tokens (the engine lock is released, so weights can be swapped) until
``resume``; new requests wait while paused (unless ``_refusal`` refuses them, as a
sleeping engine does).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from runtime.rollout.outputs import EngineError
from runtime.rollout.protocol import PAUSE_MODES

__all__ = ["PauseControl"]


class PauseControl:
    """Pause / resume / abort state of an engine. The engine calls ``_init_pause`` and
    holds its model lock in ``self._lock``, which ``_checkpoint`` releases while frozen."""

    _lock: threading.Lock

    def _init_pause(self) -> None:
        self._cond = threading.Condition()  # pause state
        self._paused = False
        self._pause_mode = "abort"
        self._abort_epoch = 0
        self._inflight = 0
        self._closed = False

    def pause(self, mode: str = "abort") -> None:
        """vLLM's ``pause_generation``: new requests wait; in-flight ones are aborted
        (``abort``), finished (``wait``, returns when they are done) or frozen (``keep``)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._cond:
            self._paused = True
            self._pause_mode = mode
            if mode == "abort":
                self._abort_epoch += 1
            self._cond.notify_all()
            if mode in ("abort", "wait"):
                self._cond.wait_for(lambda: self._inflight == 0)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def is_paused(self) -> bool:
        return self._paused

    @property
    def num_inflight(self) -> int:
        """Generations admitted and not yet returned (running, queued or frozen)."""
        return self._inflight

    def abort_all(self) -> None:
        """End every in-flight generation (finish_reason "abort") without pausing."""
        with self._cond:
            self._abort_epoch += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Shut down: abort in-flight generations and refuse new ones (503)."""
        with self._cond:
            self._closed = True
            self._abort_epoch += 1
            self._cond.notify_all()

    def _refusal(self) -> EngineError | None:
        """Why a generation cannot be admitted now (None: it can); read under ``_cond``.
        ``runtime.rollout.sleeping.SleepControl`` refuses while asleep."""
        return None

    @contextmanager
    def _admitted(self) -> Iterator[int]:
        """Wait while paused, then count the request in flight; yields its abort epoch."""
        with self._cond:
            self._cond.wait_for(
                lambda: not self._paused or self._closed or self._refusal() is not None
            )
            if self._closed:
                raise EngineError("the engine is shutting down", status=503)
            refused = self._refusal()
            if refused is not None:
                raise refused
            self._inflight += 1
            epoch = self._abort_epoch
        try:
            yield epoch
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def _checkpoint(self, epoch: int) -> bool:
        """Between two tokens (engine lock held): True if this generation must abort.
        In keep-mode pause the lock is released until resume, so that weights can be
        swapped while the generation is frozen."""
        with self._cond:
            if self._abort_epoch != epoch:
                return True
            frozen = self._paused and self._pause_mode == "keep"
        if not frozen:
            return False
        self._lock.release()
        try:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        not (self._paused and self._pause_mode == "keep")
                        or self._abort_epoch != epoch
                    )
                )
        finally:
            self._lock.acquire()
        return self._abort_epoch != epoch

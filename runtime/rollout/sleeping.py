"""Sleep mode of the embedded engine, as vLLM's (``--enable-sleep-mode``, dev routes
``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping``; vLLM 0.30's
``EngineCore.sleep`` / ``wake_up`` / ``is_sleeping`` and ``Executor.sleep`` / ``wake_up``).

Colocated placement (trainer and rollout engines on the same GPUs) puts the engines to
sleep while the trainer steps. The protocol:

- ``sleep(level, mode)``: first pause as ``/pause?mode=`` does (``abort`` ends in-flight
  generations, ``wait`` lets them finish, ``keep`` freezes them), then release memory.
  Level 0 only pauses. Level 1 offloads the weights to host memory and discards the KV
  cache; level 2 discards both (the caller reloads the weights after waking). Sleeping
  again while asleep changes nothing (vLLM warns).
- ``wake_up(tags)``: ``tags`` among ``weights`` / ``kv_cache`` (``scheduling``, vLLM's
  level-0 tag, only resumes); None wakes everything. Waking ``weights`` after level 1
  restores the exact offloaded tensors; after level 2 it allocates uninitialised tensors
  of the right shapes and dtypes, to be overwritten by a weight load (``load_weights``:
  ``/update_weights`` or ``/collective_rpc reload_weights``). A tag that is not asleep
  makes the call a no-op, as in vLLM. Once nothing is asleep the engine resumes (frozen
  ``keep`` generations continue).
- ``is_sleeping``: vLLM's definition, paused (``/pause`` or level 0) or any tag asleep.

The sleeping state is the *parameters'* storage: each parameter's ``data`` becomes an
empty tensor (buffers stay, as vLLM saves and restores them). This engine has no KV-cache
pool (each generation owns its cache), so ``kv_cache`` only gates generation, and frozen
``keep`` generations keep their caches across a sleep.

Deliberate differences from vLLM, which would queue requests while asleep (and compute on
unmapped memory after a forgotten reload): a generation request that arrives while the
weights or the KV cache are asleep is refused (``EngineError``, HTTP 503); after a level-2
sleep the engine refuses generations (HTTP 409) until a weight load, even once awake, and
aborts ``keep`` generations frozen across the sleep; loading weights while they are asleep
is refused (409); an unknown tag, level or mode is a ``ValueError`` (HTTP 400). Without
``--enable-sleep-mode`` vLLM's allocator pool holds nothing, so a level-1 or level-2 sleep
"succeeds" with every byte still in use; this engine refuses it (``EngineError``, HTTP 400).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from runtime.rollout.outputs import EngineError
from runtime.rollout.protocol import PAUSE_MODES

__all__ = ["SLEEP_LEVELS", "SLEEP_TAGS", "SleepControl"]

SLEEP_LEVELS: tuple[int, ...] = (0, 1, 2)
SLEEP_TAGS: tuple[str, ...] = ("weights", "kv_cache")
_WAKE_TAGS = (*SLEEP_TAGS, "scheduling")


class SleepControl:
    """Sleep / wake-up state of an engine (a mixin next to ``PauseControl``). The engine
    calls ``_init_sleep``; it holds ``model``, the model lock ``_lock`` and the pause
    condition ``_cond`` (every sleep-state change is made and notified under it)."""

    model: torch.nn.Module
    _lock: threading.Lock
    _cond: threading.Condition
    _paused: bool

    if TYPE_CHECKING:  # PauseControl's

        def pause(self, mode: str = "abort") -> None: ...

        def resume(self) -> None: ...

        def abort_all(self) -> None: ...

    def _init_sleep(self, enabled: bool) -> None:
        self.sleep_mode_enabled = enabled  # vLLM's --enable-sleep-mode
        self._sleep_guard = threading.Lock()  # one sleep / wake_up at a time
        self._sleeping_tags: set[str] = set()
        self._sleep_level = 0
        # name -> host tensor (level 1), or (shape, dtype, device) to allocate (level 2)
        self._offloaded: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._weights_stale = False  # woken after level 2 and not loaded since

    # -- protocol -------------------------------------------------------------------------
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """vLLM's ``sleep(level, mode)``: pause with ``mode``, then (level ≥ 1) release the
        weights (level 1: offloaded to host memory; level 2: discarded) and the KV cache."""
        if level not in SLEEP_LEVELS:
            raise ValueError(f"sleep level must be one of {SLEEP_LEVELS}, got {level!r}")
        if mode not in PAUSE_MODES:
            raise ValueError(f"sleep mode must be one of {PAUSE_MODES}, got {mode!r}")
        if level > 0 and not self.sleep_mode_enabled:
            raise EngineError("sleep mode is off: start the engine with --enable-sleep-mode "
                              "to release its memory", status=400)
        with self._sleep_guard:
            self.pause(mode)
            if level == 0 or self._sleeping_tags:
                return  # level 0 only pauses; already asleep: vLLM warns and does nothing
            # Frozen (keep) generations released the model lock; others are gone.
            with self._lock, torch.no_grad():
                for name, p in self.model.named_parameters():
                    self._shapes[name] = (p.shape, p.dtype, p.device)
                    if level == 1:
                        self._offloaded[name] = p.data.to("cpu")
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                with self._cond:
                    self._sleep_level = level
                    self._sleeping_tags = set(SLEEP_TAGS)
                    self._cond.notify_all()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """vLLM's ``wake_up(tags)``: wake ``tags`` (None: all); resume once nothing sleeps."""
        wake: list[str] | None = None  # None: every tag asleep
        if tags is not None:
            bad = [t for t in tags if t not in _WAKE_TAGS]
            if bad:
                raise ValueError(f"wake_up tags must be among {_WAKE_TAGS}, got {bad}")
            wake = [t for t in tags if t != "scheduling"]  # [] only resumes
        with self._sleep_guard:
            if (wake is None or wake) and self._sleeping_tags:
                todo = set(self._sleeping_tags) if wake is None else set(wake)
                if todo <= self._sleeping_tags:  # else vLLM warns and wakes nothing
                    if "weights" in todo:
                        self._restore_weights()
                    with self._cond:
                        self._sleeping_tags -= todo
                        self._cond.notify_all()
            if not self._sleeping_tags:
                if self._weights_stale:
                    self.abort_all()  # frozen generations must not run on unloaded weights
                self.resume()

    @property
    def is_sleeping(self) -> bool:
        """vLLM's ``is_sleeping``: paused (``/pause`` or level 0) or any tag asleep."""
        return self._paused or bool(self._sleeping_tags)

    @property
    def sleeping_tags(self) -> frozenset[str]:
        """The parts asleep (``weights``, ``kv_cache``); empty when awake."""
        return frozenset(self._sleeping_tags)

    # -- engine hooks ---------------------------------------------------------------------
    def _restore_weights(self) -> None:
        with self._lock, torch.no_grad():
            for name, p in self.model.named_parameters():
                shape, dtype, device = self._shapes[name]
                if self._sleep_level == 1:
                    p.data = self._offloaded.pop(name).to(device)
                else:
                    p.data = torch.empty(shape, dtype=dtype, device=device)
            self._shapes.clear()
            self._offloaded.clear()
            with self._cond:
                self._weights_stale = self._sleep_level == 2
                self._cond.notify_all()

    def _refusal(self) -> EngineError | None:
        """Why a generation cannot be admitted now (None: it can). Read under ``_cond``."""
        if self._sleeping_tags:
            asleep = ", ".join(sorted(self._sleeping_tags))
            return EngineError(
                f"the engine is asleep ({asleep}); POST /wake_up before generating", status=503
            )
        if self._weights_stale:
            return EngineError(
                "the engine woke from a level-2 sleep, which discarded its weights: load "
                "weights (/update_weights or /collective_rpc reload_weights) before generating",
                status=409,
            )
        return None

    def _check_weights_awake(self) -> None:
        """Before a weight load: the parameters must have their storage."""
        if "weights" in self._sleeping_tags:
            raise EngineError(
                "the weights are asleep; POST /wake_up?tags=weights before loading weights",
                status=409,
            )

    def _weights_loaded(self) -> None:
        """After a weight load (model lock held): the weights are valid again."""
        with self._cond:
            self._weights_stale = False
            self._cond.notify_all()

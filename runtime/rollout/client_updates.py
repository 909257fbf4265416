"""Pause / resume and weight updates of the rollout client: the ``WeightUpdates`` mixin
that ``runtime.rollout.client.RolloutClient`` inherits.

It holds vLLM's control calls broadcast to every endpoint: ``pause`` / ``resume``,
sleep mode's ``sleep`` / ``wake_up`` / ``is_sleeping`` (colocated placement; see
``runtime.rollout.sleeping``),
``update_weight_version``, the update sequence (start_weight_update →
update_weights → finish_weight_update) of ``update_weights``, the weight-transfer
engine set-up (``world_sizes``, ``init_weight_transfer_engine``; see
``runtime.rollout.weight_transfer``) and the path reload ``reload_weights``
(``/collective_rpc reload_weights``). The HTTP transport (``_request``,
``_broadcast``) and ``endpoints`` come from ``RolloutClient``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from runtime.rollout.client_errors import RolloutError
from runtime.rollout.protocol import PAUSE_MODES

__all__ = ["WeightUpdates"]


class WeightUpdates:
    """Control and weight-update calls of ``RolloutClient`` (a mixin)."""

    endpoints: list[str]

    if TYPE_CHECKING:

        def _request(
            self,
            endpoint: str,
            method: str,
            path: str,
            body: Mapping[str, Any] | None = None,
            *,
            query: Mapping[str, Any] | None = None,
            timeout: float | None = None,
        ) -> Any: ...

        def _broadcast(self, fn: Any) -> list[Any]: ...

    # -- control --------------------------------------------------------------------------
    def pause(self, mode: str = "abort") -> None:
        """``POST /pause?mode=...`` on every endpoint (abort | wait | keep)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}")
        self._broadcast(lambda e: self._request(e, "POST", "/pause", query={"mode": mode}))

    def resume(self) -> None:
        self._broadcast(lambda e: self._request(e, "POST", "/resume"))

    # -- sleep mode (vLLM's dev routes; runtime.rollout.sleeping) --------------------------
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """``POST /sleep?level=...&mode=...`` on every endpoint: pause (``mode``: abort |
        wait | keep), then level 1 offloads the weights and drops the KV cache, level 2
        drops both (reload the weights after waking them), level 0 only pauses."""
        if level not in (0, 1, 2):
            raise ValueError(f"level must be 0, 1 or 2, got {level!r}")
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}")
        query = {"level": str(int(level)), "mode": mode}
        self._broadcast(lambda e: self._request(e, "POST", "/sleep", query=query))

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """``POST /wake_up`` on every endpoint, ``tags`` (``weights``, ``kv_cache``) as
        repeated ``?tags=`` parameters; None wakes everything."""
        if isinstance(tags, str):
            raise TypeError("tags must be a sequence of tag names, not a string")
        query = {"tags": [str(t) for t in tags]} if tags else None
        self._broadcast(lambda e: self._request(e, "POST", "/wake_up", query=query))

    def is_sleeping(self) -> list[bool]:
        """``GET /is_sleeping`` of every endpoint, in order (vLLM: paused or asleep)."""
        return [
            bool(r["is_sleeping"])
            for r in self._broadcast(lambda e: self._request(e, "GET", "/is_sleeping"))
        ]

    def update_weight_version(self, version: str) -> None:
        self._broadcast(
            lambda e: self._request(
                e, "POST", "/update_weight_version", {"new_version": str(version)}
            )
        )

    def update_weights(
        self,
        path: str,
        version: str,
        *,
        update_info: Mapping[str, Any] | None = None,
        pause_mode: str | None = "wait",
    ) -> None:
        """Load new weights on every endpoint and publish ``version``.

        vLLM's sequence per endpoint: start_weight_update → update_weights
        (``update_info``, default ``{"path": path}`` for the embedded server's disk
        backend) → finish_weight_update(weight_version). With ``pause_mode`` the
        endpoints are paused first (``wait``: in-flight requests finish on the old
        weights) and resumed afterwards; pass None when the caller manages pausing.
        A failed update still closes the update where the endpoint has not (finish without
        a version) so it accepts the next one, then raises the update's error.
        """
        info = dict(update_info) if update_info is not None else {"path": str(path)}
        if pause_mode is not None:
            self.pause(pause_mode)
        try:

            def one(endpoint: str) -> None:
                self._request(
                    endpoint, "POST", "/start_weight_update", {"is_checkpoint_format": True}
                )
                try:
                    self._request(endpoint, "POST", "/update_weights", {"update_info": info})
                except RolloutError:
                    # vLLM 0.33's workers close an update that raised themselves, and then
                    # refuse this finish (500): the update's own error is the one to raise.
                    with contextlib.suppress(RolloutError):
                        self._request(endpoint, "POST", "/finish_weight_update", {})
                    raise
                self._request(
                    endpoint, "POST", "/finish_weight_update", {"weight_version": str(version)}
                )

            self._broadcast(one)
        finally:
            if pause_mode is not None:
                self.resume()


    # -- weight transfer engines (runtime.rollout.weight_transfer) ------------------------
    def world_sizes(self) -> list[int]:
        """``GET /get_world_size`` of every endpoint: its workers (TP · PP · DP), in order."""
        return [
            int(r["world_size"])
            for r in self._broadcast(
                lambda e: self._request(e, "GET", "/get_world_size", timeout=30.0)
            )
        ]

    def init_weight_transfer_engine(self, init_infos: Sequence[Mapping[str, Any]]) -> None:
        """``POST /init_weight_transfer_engine {"init_info": init_infos[k]}`` on endpoint k.

        The calls run concurrently: with NCCL every worker of every endpoint joins one
        rendezvous, which returns only once all of them (and the trainer) are in."""
        if len(init_infos) != len(self.endpoints):
            raise ValueError(f"need one init_info per endpoint ({len(self.endpoints)}), "
                             f"got {len(init_infos)}")
        infos = dict(zip(self.endpoints, init_infos, strict=True))
        self._broadcast(
            lambda e: self._request(
                e, "POST", "/init_weight_transfer_engine", {"init_info": dict(infos[e])}
            )
        )

    def reload_weights(self, path: str, version: str, *, pause_mode: str | None = "wait",
                       then: Sequence[str] = ()) -> None:
        """Reload every endpoint's weights from the checkpoint folder ``path``, publish ``version``.

        vLLM 0.33 has no disk transfer backend; its path reload is the workers'
        ``reload_weights(weights_path=...)`` (checkpoint format, layerwise) reached through
        ``POST /collective_rpc`` (dev mode, string kwargs only). ``then``: worker methods
        (``--worker-extension-cls``, ``runtime.rollout.vllm_worker``) called after the reload,
        before the version is published. Pausing with ``wait`` (or ``abort``) also clears the
        prefix cache, whose entries the old weights computed."""
        rpcs = [{"method": "reload_weights", "kwargs": {"weights_path": str(path)}},
                *({"method": str(m)} for m in then)]
        if pause_mode is not None:
            self.pause(pause_mode)
        try:
            for rpc in rpcs:
                self._broadcast(lambda e, rpc=rpc: self._request(e, "POST", "/collective_rpc",
                                                                 rpc))
            self.update_weight_version(version)
        finally:
            if pause_mode is not None:
                self.resume()

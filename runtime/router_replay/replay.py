"""Record / replay state machine of MoE routers (R2 / R3).

Each MoE layer's router carries a ``RouterReplay`` with a mode: ``"off"`` (normal
top-k), ``"record"`` (normal top-k, ids kept) or ``"replay"`` (given ids selected, gates
recomputed from the live logits by ``select_experts``). ``RouterReplayGroup`` is the list of
them in layer order: R2 records in the old-policy forward and replays in the update
forwards; R3 replays the rollout engine's ids in both.

``RouterReplay.route`` calls ``select_experts`` through the package
(``runtime.router_replay.select_experts``), as the single module did, so that a patch of
that name (the trainer's R3 test spies on it) still reaches every router.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import runtime.router_replay as _package
from runtime.router_replay.codec import _torch_storage_dtype
from runtime.router_replay.selection import _MODES, ReplayMode, RoutingMismatch, ScoreFunction
from runtime.router_replay.trace import RoutingTrace, _check_ids_tensor

__all__ = ["Recording", "RouterReplay", "RouterReplayGroup", "collect_router_replays"]


class RouterReplay:
    """Record / replay state of one MoE layer's router.

    Modes: ``"off"`` (normal top-k), ``"record"`` (normal top-k; the chosen ids are
    kept in ``recorded``), ``"replay"`` (the target ids set with
    ``set_target_indices`` are selected; gates recomputed from the live logits).
    Method names follow megatron-core's ``RouterReplay``. One forward per record /
    replay: recording keeps the last forward's ids, replay applies the same target to
    every forward (so an activation-checkpointing recompute sees the same ids).
    """

    def __init__(self, num_experts: int, top_k: int, layer: int = 0) -> None:
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"need 1 ≤ top_k ≤ num_experts, got top_k={top_k}, num_experts={num_experts}"
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.layer = layer
        self._mode: ReplayMode = "off"
        self.recorded: torch.Tensor | None = None
        self._target: torch.Tensor | None = None
        self._target_mask: torch.Tensor | None = None
        self._target_cache: tuple[torch.device, torch.Tensor, torch.Tensor | None] | None = None

    def __repr__(self) -> str:
        return (
            f"RouterReplay(layer={self.layer}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, mode={self._mode!r})"
        )

    @property
    def mode(self) -> ReplayMode:
        return self._mode

    @mode.setter
    def mode(self, mode: ReplayMode) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self._mode = mode

    # -- megatron-core style API ----------------------------------------------------
    def record_indices(self, ids: torch.Tensor) -> None:
        """Keep ``ids`` [N, k] (detached) as this layer's recorded routing."""
        self.recorded = ids.detach()

    def get_recorded_indices(self) -> torch.Tensor | None:
        return self.recorded

    def set_target_indices(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Set the ids [N, k] to replay; ``mask`` [N] (True = replay) leaves the False
        rows to the live router. Shape and id range are checked here, once."""
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(np.asarray(ids))
        _check_ids_tensor(ids, self.num_experts, what=f"layer {self.layer} replay ids")
        if ids.dim() != 2 or ids.shape[1] != self.top_k:
            raise RoutingMismatch(
                f"layer {self.layer}: replay ids must be [N, {self.top_k}], got {tuple(ids.shape)}"
            )
        if mask is not None:
            mask = mask.to(dtype=torch.bool)
            if mask.shape != ids.shape[:1]:
                raise RoutingMismatch(
                    f"layer {self.layer}: replay mask must be [{ids.shape[0]}], got {tuple(mask.shape)}"
                )
            if bool(mask.all()):
                mask = None
        self._target = ids
        self._target_mask = mask
        self._target_cache = None

    def clear_indices(self) -> None:
        self.recorded = None
        self._target = None
        self._target_mask = None
        self._target_cache = None

    def _device_target(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._target is None:
            raise RuntimeError(f"layer {self.layer}: replay mode but no target ids were set")
        cache = self._target_cache
        if cache is None or cache[0] != device:
            ids = self._target.to(device=device, dtype=torch.long)
            mask = None if self._target_mask is None else self._target_mask.to(device)
            cache = (device, ids, mask)
            self._target_cache = cache
        return cache[1], cache[2]

    # -- routing ------------------------------------------------------------------
    def route(
        self,
        logits: torch.Tensor,
        *,
        score_function: ScoreFunction = "softmax",
        expert_bias: torch.Tensor | None = None,
        norm_topk_prob: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``select_experts`` on ``logits`` [N, E] under this layer's mode."""
        if logits.shape[-1] != self.num_experts:
            raise RoutingMismatch(
                f"layer {self.layer}: router has {logits.shape[-1]} experts, replay state "
                f"expects {self.num_experts}"
            )
        if self._mode == "replay":
            ids, mask = self._device_target(logits.device)
            return _package.select_experts(
                logits,
                self.top_k,
                score_function=score_function,
                expert_bias=expert_bias,
                norm_topk_prob=norm_topk_prob,
                replay_ids=ids,
                replay_mask=mask,
            )
        gates, ids = _package.select_experts(
            logits,
            self.top_k,
            score_function=score_function,
            expert_bias=expert_bias,
            norm_topk_prob=norm_topk_prob,
        )
        if self._mode == "record":
            self.record_indices(ids)
        return gates, ids

    # -- context managers -----------------------------------------------------------
    @contextmanager
    def recording(self) -> Iterator[RouterReplay]:
        """Record mode inside the block; the ids are in ``self.recorded`` afterwards."""
        previous = self._mode
        self.recorded = None
        self._mode = "record"
        try:
            yield self
        finally:
            self._mode = previous

    @contextmanager
    def replaying(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None
    ) -> Iterator[RouterReplay]:
        """Replay ``ids`` [N, k] inside the block; the previous mode is restored after."""
        previous = self._mode
        self.set_target_indices(ids, mask)
        self._mode = "replay"
        try:
            yield self
        finally:
            self._mode = previous
            self._target = None
            self._target_mask = None
            self._target_cache = None


@dataclass
class Recording:
    """Result holder of ``RouterReplayGroup.recording()``; ``trace`` is set on exit."""

    _trace: RoutingTrace | None = None

    @property
    def trace(self) -> RoutingTrace:
        if self._trace is None:
            raise RuntimeError("the recording has not finished (or no forward ran inside it)")
        return self._trace


class RouterReplayGroup(list[RouterReplay]):
    """The ``RouterReplay`` of every MoE layer of a model, in layer order.

    R2: ``with group.recording() as rec: old-policy forward`` then
    ``with group.replaying(rec.trace): update forward``.
    R3: ``with group.replaying(trace_from_engine): forward`` (old-policy and update).
    """

    def set_mode(self, mode: ReplayMode) -> None:
        for r in self:
            r.mode = mode

    def clear(self) -> None:
        for r in self:
            r.clear_indices()

    def recorded_trace(self) -> RoutingTrace:
        """The ids recorded by the last forward, as a [N, L, k] trace (uint8/int16)."""
        if not self:
            raise RuntimeError("no MoE layers")
        missing = [r.layer for r in self if r.recorded is None]
        if missing:
            raise RuntimeError(f"nothing recorded for MoE layers {missing}")
        rows = {r.recorded.shape[0] for r in self}  # type: ignore[union-attr]
        if len(rows) != 1:
            raise RoutingMismatch(f"layers recorded different token counts: {sorted(rows)}")
        dtype = _torch_storage_dtype(self[0].num_experts)
        ids = torch.stack([r.recorded.to(dtype) for r in self], dim=1)  # type: ignore[union-attr]
        return RoutingTrace(ids, self[0].num_experts)

    @contextmanager
    def recording(self) -> Iterator[Recording]:
        """Record every layer inside the block; ``rec.trace`` holds the ids afterwards."""
        previous = [r.mode for r in self]
        rec = Recording()
        for r in self:
            r.recorded = None
            r.mode = "record"
        try:
            yield rec
            rec._trace = self.recorded_trace()
        finally:
            for r, mode in zip(self, previous, strict=True):
                r.mode = mode
                r.recorded = None

    @contextmanager
    def replaying(
        self, trace: RoutingTrace | Sequence[torch.Tensor]
    ) -> Iterator[RouterReplayGroup]:
        """Replay ``trace`` (or one [N, k] id tensor per layer) inside the block."""
        if not self:
            raise RuntimeError("no MoE layers")
        if isinstance(trace, RoutingTrace):
            trace.validate(
                num_layers=len(self), top_k=self[0].top_k, num_experts=self[0].num_experts
            )
            per_layer = [trace.layer(i) for i in range(len(self))]
        else:
            if len(trace) != len(self):
                raise RoutingMismatch(f"got ids for {len(trace)} layers, the model has {len(self)}")
            per_layer = [(ids, None) for ids in trace]
        previous = [r.mode for r in self]
        try:
            for r, (ids, mask) in zip(self, per_layer, strict=True):
                r.set_target_indices(ids, mask)
                r.mode = "replay"
            yield self
        finally:
            for r, mode in zip(self, previous, strict=True):
                r.mode = mode
                r._target = None
                r._target_mask = None
                r._target_cache = None


def collect_router_replays(model: nn.Module) -> RouterReplayGroup:
    """All ``RouterReplay`` objects reachable in ``model`` (``MoEBlock.replay`` and
    routers patched by ``patch_moe_routers``), in module order."""
    found = RouterReplayGroup()
    for module in model.modules():
        rr = getattr(module, "router_replay", None)
        if isinstance(rr, RouterReplay):
            found.append(rr)
    return found

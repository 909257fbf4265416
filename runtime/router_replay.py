"""Router replay for MoE RL training (R2 / R3).

The problem: the experts a token is sent to are chosen by a discrete top-k, so the
inference engine that sampled a response and the trainer that computes its
log-probabilities can route the same token to different experts (different
kernels, precision, batch composition, or simply newer weights). Replay makes the
trainer select *exactly* a given set of experts while keeping the gate weights a
differentiable function of the trainer's own router logits, so the router still
learns.

* **R3** (rollout routing replay): the rollout engine returns, per token and MoE
  layer, the top-k expert ids it used (vLLM: ``routed_experts``); the trainer replays
  them in its old-policy and update forwards.
* **R2** (trainer routing replay): the ids are recorded in the trainer's own
  old-policy forward and replayed in the update forwards of the same batch.

Selection and gates (``select_experts``), with live router logits s ∈ R^E:

* softmax routers: p = softmax(s); normal selection sel = top-k(p (+ bias));
  with ``norm_topk_prob`` the gates are
  g_i = p_i / Σ_{j∈sel} p_j = e^{s_i} / Σ_{j∈sel} e^{s_j}  (i ∈ sel),
  otherwise g_i = p_i (the full-softmax probability at the selected id).
* sigmoid routers (DeepSeek-V3): σ = sigmoid(s); sel = top-k(σ + b) where the expert
  bias b only influences the choice; gates g_i = σ_i / (Σ_{j∈sel} σ_j + 1e-20) with
  ``norm_topk_prob`` (as DeepSeek-V3 does), otherwise g_i = σ_i.
* replay: sel is given (the replay ids); the gates use the same formulas on the live
  logits, so ∂g/∂s ≠ 0 and the router keeps receiving gradient.

Storage: ids are kept as uint8 when the model has ≤ 256 experts, else int16.

transformers' DeepSeek-V3 router (``patch_deepseek_v3``) selects with the bias and the group
limit, sel = top-k over the chosen groups of (σ + b); in replay sel is the given ids (the bias
and the group limit are already in the recorded choice) and the gates are its own formula on
the live scores, g_i = σ_i / (Σ_{j∈sel} σ_j + 1e-20) · routed_scaling_factor (normalised only
with ``norm_topk_prob``), so the router weight keeps its gradient. GLM-4.5's router
(``Glm4MoeTopkRouter``, ``patch_glm4_moe``) has the same fields and arithmetic and takes the
same replay forward.

This module depends on torch and numpy only (transformers is imported lazily in
``patch_qwen3_moe`` / ``patch_deepseek_v3``); it never imports the ``compiler`` package.
"""

from __future__ import annotations

import base64
import binascii
import io
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MoEBlock",
    "Recording",
    "ReplayMode",
    "RouterReplay",
    "RouterReplayGroup",
    "RoutingMismatch",
    "RoutingTrace",
    "ScoreFunction",
    "align_routing",
    "collect_router_replays",
    "compact",
    "decode_routed_experts",
    "encode_routed_experts",
    "patch_deepseek_v3",
    "patch_glm4_moe",
    "patch_moe_routers",
    "patch_qwen3_moe",
    "routing_bytes_per_token",
    "select_experts",
    "storage_dtype",
]

ReplayMode = Literal["off", "record", "replay"]
ScoreFunction = Literal["softmax", "sigmoid"]

_MODES: tuple[str, ...] = ("off", "record", "replay")
# Below this sum of selected softmax probabilities the p_i / Σ p_j form loses precision
# (the p_i are subnormal or zero); the gates are then taken from softmax over the
# selected logits, which is the same quantity computed stably.
_UNDERFLOW = 1e-30
# DeepSeek-V3's guard in the sigmoid gate normalisation.
_SIGMOID_EPS = 1e-20
# Largest expert count whose ids fit the int16 storage dtype.
_MAX_EXPERTS = int(np.iinfo(np.int16).max) + 1


class RoutingMismatch(ValueError):
    """Routing ids do not fit the model or the sequence they are applied to."""


# --------------------------------------------------------------------------------------
# Top-k selection
# --------------------------------------------------------------------------------------


def select_experts(
    logits: torch.Tensor,
    top_k: int,
    *,
    score_function: ScoreFunction = "softmax",
    expert_bias: torch.Tensor | None = None,
    norm_topk_prob: bool = True,
    replay_ids: torch.Tensor | None = None,
    replay_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token and their gate weights.

    ``logits``: router logits s, shape [N, E]. Returns ``(gates [N, k] float32,
    expert_ids [N, k] int64)``.

    Scores: softmax routers p = softmax(s) (float32), sigmoid routers σ = sigmoid(s).
    Normal selection: ids = top-k(score + expert_bias) (the bias, if any, only steers
    the choice). Replay: ids = ``replay_ids`` (any integer dtype, [N, k]); where
    ``replay_mask`` [N] (bool) is given, rows with ``False`` use the normal selection.

    Gates from the live scores at the chosen ids:

    * softmax, ``norm_topk_prob``: g_i = p_i / Σ_{j∈sel} p_j = e^{s_i}/Σ_{j∈sel} e^{s_j}
      (bitwise the same arithmetic as transformers' Qwen3-MoE router; in replay, rows
      whose Σ_{j∈sel} p_j underflows below 1e-30 use softmax over the selected logits);
    * softmax, not normalised: g_i = p_i (full-softmax probability at the selected id);
    * sigmoid, ``norm_topk_prob``: g_i = σ_i / (Σ_{j∈sel} σ_j + 1e-20) (DeepSeek-V3);
    * sigmoid, not normalised: g_i = σ_i.

    Gradients flow from the gates to ``logits`` in every mode (replay included).
    Ids out of range in ``replay_ids`` are not checked here (that would synchronise
    the device on every call); ``RouterReplay`` / ``RoutingTrace`` check them once.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, E], got shape {tuple(logits.shape)}")
    n, e = logits.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, {e}], got {top_k}")
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
    else:
        raise ValueError(f"score_function must be 'softmax' or 'sigmoid', got {score_function!r}")

    live_ids: torch.Tensor | None = None
    top: torch.Tensor | None = None
    if replay_ids is None or replay_mask is not None:
        if expert_bias is None:
            top, live_ids = torch.topk(scores, top_k, dim=-1)
        else:
            if expert_bias.shape != (e,):
                raise ValueError(
                    f"expert_bias must have shape ({e},), got {tuple(expert_bias.shape)}"
                )
            choice = scores.detach() + expert_bias.detach().to(scores.dtype)
            live_ids = torch.topk(choice, top_k, dim=-1).indices

    if replay_ids is None:
        assert live_ids is not None
        ids = live_ids
        if top is None:
            top = scores.gather(1, ids)
    else:
        if replay_ids.shape != (n, top_k):
            raise RoutingMismatch(
                f"replay ids have shape {tuple(replay_ids.shape)}, but the router sees "
                f"{n} tokens with top_k={top_k} (expected ({n}, {top_k}))"
            )
        ids = replay_ids.to(device=logits.device, dtype=torch.long)
        if replay_mask is not None:
            if replay_mask.shape != (n,):
                raise RoutingMismatch(
                    f"replay mask has shape {tuple(replay_mask.shape)}, expected ({n},)"
                )
            assert live_ids is not None
            mask = replay_mask.to(device=logits.device, dtype=torch.bool)
            ids = torch.where(mask[:, None], ids, live_ids)
        top = scores.gather(1, ids)

    if not norm_topk_prob:
        return top, ids
    denom = top.sum(dim=-1, keepdim=True)
    if score_function == "sigmoid":
        return top / (denom + _SIGMOID_EPS), ids
    if replay_ids is None:
        # the largest probability is ≥ 1/E: no underflow possible.
        return top / denom, ids
    gates = top / denom.clamp_min(_UNDERFLOW)
    stable = torch.softmax(logits.gather(1, ids).float(), dim=-1)
    return torch.where(denom < _UNDERFLOW, stable, gates), ids


# --------------------------------------------------------------------------------------
# Per-layer replay state
# --------------------------------------------------------------------------------------


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
            return select_experts(
                logits,
                self.top_k,
                score_function=score_function,
                expert_bias=expert_bias,
                norm_topk_prob=norm_topk_prob,
                replay_ids=ids,
                replay_mask=mask,
            )
        gates, ids = select_experts(
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


def _check_ids_tensor(ids: torch.Tensor, num_experts: int, *, what: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise RoutingMismatch(f"{what}: expert ids must be integers, got {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_experts:
        raise RoutingMismatch(
            f"{what}: expert ids must be in [0, {num_experts}), found range [{lo}, {hi}]"
        )


# --------------------------------------------------------------------------------------
# Traces (ids of all MoE layers for a batch)
# --------------------------------------------------------------------------------------


@dataclass
class RoutingTrace:
    """Expert ids of every MoE layer for one sequence or a batch.

    ``ids``: integer tensor [*tokens, L, k] (``tokens`` = (T,) for a sequence,
    (B, T) for a batch, flattened row-major exactly as a router flattens its
    [B, T, hidden] input). ``mask``: bool [*tokens] or None; False marks positions
    without replay ids (routed by the trainer's live router; their ``ids`` rows are
    fillers 0..k−1). ``num_experts``: the model's expert count E.
    """

    ids: torch.Tensor
    num_experts: int
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ids, torch.Tensor):
            self.ids = torch.as_tensor(np.asarray(self.ids))
        if self.ids.dim() < 3:
            raise RoutingMismatch(
                f"trace ids must be [*tokens, layers, top_k], got shape {tuple(self.ids.shape)}"
            )
        if self.mask is not None:
            if not isinstance(self.mask, torch.Tensor):
                self.mask = torch.as_tensor(np.asarray(self.mask))
            self.mask = self.mask.to(dtype=torch.bool)
            if tuple(self.mask.shape) != self.token_shape:
                raise RoutingMismatch(
                    f"trace mask has shape {tuple(self.mask.shape)}, expected {self.token_shape}"
                )

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[-2])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def token_shape(self) -> tuple[int, ...]:
        return tuple(self.ids.shape[:-2])

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.token_shape, dtype=np.int64))

    def validate(
        self,
        *,
        num_layers: int | None = None,
        top_k: int | None = None,
        num_experts: int | None = None,
    ) -> None:
        """Raise ``RoutingMismatch`` unless the trace fits a model with these sizes."""
        if num_experts is not None and num_experts != self.num_experts:
            raise RoutingMismatch(
                f"trace is for {self.num_experts} experts, the model has {num_experts}"
            )
        if num_layers is not None and num_layers != self.num_layers:
            raise RoutingMismatch(
                f"trace has {self.num_layers} MoE layers, the model has {num_layers}"
            )
        if top_k is not None and top_k != self.top_k:
            raise RoutingMismatch(f"trace has top_k={self.top_k}, the model has top_k={top_k}")
        _check_ids_tensor(self.ids, self.num_experts, what="trace")

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ids [N, k] and mask [N] (or None) of MoE layer ``index``, tokens flattened."""
        ids = self.ids[..., index, :].reshape(-1, self.top_k)
        mask = None if self.mask is None else self.mask.reshape(-1)
        return ids, mask

    def to(self, device: torch.device | str) -> RoutingTrace:
        mask = None if self.mask is None else self.mask.to(device)
        return RoutingTrace(self.ids.to(device), self.num_experts, mask)

    @classmethod
    def stack(
        cls,
        traces: Sequence[RoutingTrace],
        *,
        length: int | None = None,
        pad_side: Literal["right", "left"] = "right",
    ) -> RoutingTrace:
        """Batch per-sequence traces ([T_b, L, k]) into one [B, T, L, k] trace.

        T = ``length`` or max T_b; padded positions get filler ids and mask False,
        matching a batch padded on ``pad_side``.
        """
        if not traces:
            raise ValueError("stack needs at least one trace")
        first = traces[0]
        for t in traces:
            if len(t.token_shape) != 1:
                raise RoutingMismatch("stack takes per-sequence traces with ids [T, L, k]")
            if (t.num_layers, t.top_k, t.num_experts) != (
                first.num_layers,
                first.top_k,
                first.num_experts,
            ):
                raise RoutingMismatch(
                    "traces differ in (layers, top_k, num_experts): "
                    f"{(t.num_layers, t.top_k, t.num_experts)} vs "
                    f"{(first.num_layers, first.top_k, first.num_experts)}"
                )
        longest = max(t.token_shape[0] for t in traces)
        total = longest if length is None else length
        if total < longest:
            raise RoutingMismatch(f"length {total} is shorter than the longest trace ({longest})")
        dtype = _torch_storage_dtype(first.num_experts)
        filler = torch.arange(first.top_k, dtype=dtype)
        ids = filler.expand(len(traces), total, first.num_layers, first.top_k).clone()
        mask = torch.zeros(len(traces), total, dtype=torch.bool)
        for b, t in enumerate(traces):
            n = t.token_shape[0]
            span = slice(0, n) if pad_side == "right" else slice(total - n, total)
            ids[b, span] = t.ids.to(device="cpu", dtype=dtype)
            mask[b, span] = True if t.mask is None else t.mask.cpu()
        return cls(ids, first.num_experts, mask)


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


# --------------------------------------------------------------------------------------
# A small torch MoE block
# --------------------------------------------------------------------------------------


class MoEBlock(nn.Module):
    """Top-k routed MoE feed-forward block with SwiGLU experts.

    y_t = Σ_{i∈sel(t)} g_{t,i} · W_down,i (silu(W_gate,i x_t) ⊙ W_up,i x_t), with
    (g, sel) = ``select_experts(router(x_t), ...)`` consulting ``self.router_replay``.
    ``expert_bias=True`` adds a (non-trained) per-expert selection bias buffer, as in
    DeepSeek-V3's auxiliary-loss-free balancing.
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: int,
        score_function: ScoreFunction = "softmax",
        expert_bias: bool = False,
        norm_topk_prob: bool = True,
        layer: int = 0,
    ) -> None:
        super().__init__()
        if score_function not in ("softmax", "sigmoid"):
            raise ValueError(
                f"score_function must be 'softmax' or 'sigmoid', got {score_function!r}"
            )
        self.hidden = hidden
        self.ffn_hidden = ffn_hidden
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_function: ScoreFunction = score_function
        self.norm_topk_prob = norm_topk_prob
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        self.expert_bias: torch.Tensor | None
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None
        self.router_replay = RouterReplay(num_experts, top_k, layer=layer)
        self.reset_parameters()

    @property
    def replay(self) -> RouterReplay:
        return self.router_replay

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self.hidden**-0.5)
        nn.init.normal_(self.gate_up_proj, std=self.hidden**-0.5)
        nn.init.normal_(self.down_proj, std=self.ffn_hidden**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.hidden)
        logits = self.router(flat)
        gates, ids = self.router_replay.route(
            logits,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
            norm_topk_prob=self.norm_topk_prob,
        )
        return self._experts(flat, ids, gates.to(flat.dtype)).reshape(shape)

    def _experts(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token_idx = order // k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        dispatched = x.index_select(0, token_idx)
        outputs = []
        for e, chunk in enumerate(dispatched.split(counts)):
            if chunk.shape[0] == 0:
                continue
            gate, up = F.linear(chunk, self.gate_up_proj[e]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        out = torch.cat(outputs) * gates.reshape(-1).index_select(0, order)[:, None]
        return torch.zeros_like(x).index_add_(0, token_idx, out)


# --------------------------------------------------------------------------------------
# transformers Qwen3-MoE
# --------------------------------------------------------------------------------------


def _qwen3_router_forward(
    self: nn.Module, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replacement ``Qwen3MoeTopKRouter.forward`` (bound per instance)."""
    rr: RouterReplay = self.router_replay
    if rr.mode != "replay":
        out = type(self).forward(self, hidden_states)
        if rr.mode == "record":
            rr.record_indices(out[2])
        return out
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    gates, ids = rr.route(
        router_logits, score_function="softmax", norm_topk_prob=self.norm_topk_prob
    )
    return router_logits, gates.to(router_logits.dtype), ids


def _deepseek_router_forward(
    self: nn.Module, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replacement ``DeepseekV3TopkRouter.forward`` (bound per instance).

    Replay: the target ids are taken as they are (no bias, no group limit: both are in the
    recorded choice); gates from the live sigmoid scores at those ids, with the router's own
    arithmetic (gather, ``/= Σ + 1e-20`` when ``norm_topk_prob``, ``· routed_scaling_factor``),
    so a replay of the recorded ids with unchanged weights is bitwise the normal forward.
    Rows the replay mask leaves out take the router's own (biased, group-limited) choice."""
    rr: RouterReplay = self.router_replay
    if rr.mode != "replay":
        out = type(self).forward(self, hidden_states)
        if rr.mode == "record":
            rr.record_indices(out[2])
        return out
    ids, mask = rr._device_target(hidden_states.device)
    if mask is not None:  # the live choice for the rows without replay ids
        live = type(self).forward(self, hidden_states)[2]
        ids = torch.where(mask[:, None], ids, live)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    if ids.shape[0] != router_logits.shape[0]:
        raise RoutingMismatch(
            f"layer {rr.layer}: replay ids cover {ids.shape[0]} tokens, the router sees "
            f"{router_logits.shape[0]}"
        )
    scores = router_logits.sigmoid()
    topk_weights = scores.gather(1, ids)
    if self.norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + _SIGMOID_EPS
        topk_weights = topk_weights / denominator
    topk_weights = topk_weights * self.routed_scaling_factor
    return router_logits, topk_weights, ids


def _router_kinds() -> list[tuple[type, object]]:
    """(router class, replacement forward) of each HF MoE family replay supports."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    # GLM-4.5's router is DeepSeek-V3's (same fields, same arithmetic): one replay forward
    return [(Qwen3MoeTopKRouter, _qwen3_router_forward),
            (DeepseekV3TopkRouter, _deepseek_router_forward),
            (Glm4MoeTopkRouter, _deepseek_router_forward)]


def _patch(model: nn.Module, kinds: list[tuple[type, object]], what: str) -> RouterReplayGroup:
    group = RouterReplayGroup()
    for module in model.modules():
        forward = next((f for cls, f in kinds if isinstance(module, cls)), None)
        if forward is None:
            continue
        rr = getattr(module, "router_replay", None)
        if not isinstance(rr, RouterReplay):
            rr = RouterReplay(int(module.num_experts), int(module.top_k), layer=len(group))
            module.router_replay = rr
            # a bound method (not a closure) so that copy.deepcopy rebinds it to the copy
            module.forward = types.MethodType(forward, module)  # type: ignore[arg-type]
        group.append(rr)
    if not group:
        raise ValueError(f"model has no {what} modules")
    return group


def patch_qwen3_moe(model: nn.Module) -> RouterReplayGroup:
    """Attach a ``RouterReplay`` to every ``Qwen3MoeTopKRouter`` of ``model``.

    Each router's forward (→ router_logits, top-k weights, top-k indices) is replaced
    on the instance: "off" and "record" call the original forward (record keeps the
    indices); "replay" computes the same logits and takes the gates of the target ids
    with the router's own formula (softmax, renormalised if ``norm_topk_prob``), so a
    replay of the ids recorded with unchanged weights is bitwise the normal forward.
    Layers are numbered in module order over MoE layers only (dense
    ``mlp_only_layers`` have no router), the order of vLLM's moe_layers axis.
    Idempotent. Returns the group (a ``list[RouterReplay]``).
    """
    return _patch(model, _router_kinds()[:1], "Qwen3MoeTopKRouter")


def patch_deepseek_v3(model: nn.Module) -> RouterReplayGroup:
    """``patch_qwen3_moe`` for transformers' ``DeepseekV3TopkRouter`` (DeepSeek-V3,
    Moonlight): replay in :func:`_deepseek_router_forward`. Dense leading layers
    (``first_k_dense_replace``) have no router; MoE layers are numbered from 0."""
    return _patch(model, _router_kinds()[1:2], "DeepseekV3TopkRouter")


def patch_glm4_moe(model: nn.Module) -> RouterReplayGroup:
    """``patch_deepseek_v3`` for transformers' ``Glm4MoeTopkRouter`` (GLM-4.5), whose fields and
    arithmetic are DeepSeek-V3's: replay in :func:`_deepseek_router_forward`."""
    return _patch(model, _router_kinds()[2:], "Glm4MoeTopkRouter")


def patch_moe_routers(model: nn.Module) -> RouterReplayGroup:
    """The replay patch of whichever supported HF MoE family ``model`` is (Qwen3-MoE,
    DeepSeek-V3, GLM-4.5): what the embedded trainer and rollout engine call."""
    return _patch(model, _router_kinds(), "Qwen3-MoE, DeepSeek-V3 or GLM-4.5 router")


# --------------------------------------------------------------------------------------
# vLLM routed_experts codec and alignment
# --------------------------------------------------------------------------------------


def storage_dtype(num_experts: int) -> np.dtype:
    """uint8 when num_experts ≤ 256, else int16 (ids up to 32767)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be ≥ 1, got {num_experts}")
    if num_experts <= 256:
        return np.dtype(np.uint8)
    if num_experts <= _MAX_EXPERTS:
        return np.dtype(np.int16)
    raise ValueError(f"{num_experts} experts do not fit the int16 id storage (max {_MAX_EXPERTS})")


def _torch_storage_dtype(num_experts: int) -> torch.dtype:
    return torch.uint8 if storage_dtype(num_experts) == np.uint8 else torch.int16


def routing_bytes_per_token(moe_layers: int, top_k: int, num_experts: int) -> int:
    """Bytes of stored routing per token: moe_layers · top_k · itemsize(storage_dtype)."""
    return int(moe_layers * top_k * storage_dtype(num_experts).itemsize)


def _check_ids_array(arr: np.ndarray, num_experts: int, *, what: str) -> None:
    if not np.issubdtype(arr.dtype, np.integer):
        raise RoutingMismatch(f"{what}: expert ids must be integers, got dtype {arr.dtype}")
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_experts:
        raise RoutingMismatch(
            f"{what}: expert ids must be in [0, {num_experts}), found range [{lo}, {hi}]"
        )


def compact(arr: np.ndarray, num_experts: int) -> np.ndarray:
    """Check the ids lie in [0, num_experts) and cast to ``storage_dtype(num_experts)``."""
    arr = np.asarray(arr)
    _check_ids_array(arr, num_experts, what="compact")
    return arr.astype(storage_dtype(num_experts), copy=False)


def decode_routed_experts(b64: str | bytes) -> np.ndarray:
    """Decode vLLM's ``routed_experts`` (base64 of ``.npy`` bytes) to an integer array
    [num_tokens − 1, moe_layers, top_k] in the dtype the server sent (uint8/uint16/int32)."""
    try:
        raw = base64.b64decode(b64, validate=True)
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (binascii.Error, ValueError, OSError, EOFError) as exc:
        raise RoutingMismatch(f"routed_experts is not base64 of a .npy array: {exc}") from exc
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise RoutingMismatch(
            f"routed_experts must be an integer array [tokens - 1, moe_layers, top_k], got "
            f"shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.size and arr.shape[2] > 1:
        ordered = np.sort(arr, axis=2)
        repeated = (ordered[..., 1:] == ordered[..., :-1]).any(axis=(1, 2))
        if repeated.any():
            # A top-k selection names k distinct experts. vLLM run with compiled graphs returns
            # an all-zero array (its graphs do not record the routing), which would replay
            # expert 0 everywhere without a word.
            raise RoutingMismatch(
                f"routed_experts repeats an expert within one token's top-{arr.shape[2]} at "
                f"{int(repeated.sum())} of {arr.shape[0]} rows (first: row "
                f"{int(repeated.argmax())}): not a routing. An all-zero array comes from vLLM "
                "without --enforce-eager, whose compiled graphs do not record routed experts")
    return arr


def encode_routed_experts(arr: np.ndarray, *, num_experts: int | None = None) -> str:
    """Inverse of ``decode_routed_experts``: base64 of the ``.npy`` bytes of ``arr``.

    The dtype of ``arr`` is kept; with ``num_experts`` the ids are first cast to the
    smallest of uint8 / uint16 / int32 that holds them (what a server would send).
    """
    arr = np.asarray(arr)
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise RoutingMismatch(
            f"routed_experts must be an integer array [tokens - 1, moe_layers, top_k], got "
            f"shape {arr.shape} dtype {arr.dtype}"
        )
    if num_experts is not None:
        _check_ids_array(arr, num_experts, what="encode")
        wire = np.uint8 if num_experts <= 256 else np.uint16 if num_experts <= 65536 else np.int32
        arr = arr.astype(wire, copy=False)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def align_routing(
    routed: np.ndarray,
    *,
    prompt_len: int,
    response_len: int,
    num_experts: int,
    moe_layers: int | None = None,
    top_k: int | None = None,
    prompt_start: int = 0,
    prefix: np.ndarray | None = None,
) -> RoutingTrace:
    """Map vLLM's routing rows onto the positions of the trainer's forward.

    The trainer's forward runs over the n = prompt_len + response_len tokens; the
    router at position p routes the hidden state at p. vLLM returns rows for every
    token that went through its forward, i.e. all but the last sampled token, minus
    the ``prompt_start`` skipped leading prompt tokens:
    rows = n − 1 − prompt_start, and position p uses row p − prompt_start.

    Result: a trace [n, L, k] (uint8/int16) whose mask is False for

    * the last position n − 1: it has no engine routing, and it is routed by the
      trainer's own router. Its output only feeds the logits that would predict
      token n, which no loss uses, and causal attention means no other position
      reads it, so this choice changes neither the loss nor any gradient. (A trainer
      that feeds tokens[:-1] instead may slice the trace to its first n − 1 rows,
      all of which are replayed.)
    * positions < ``prompt_start`` unless ``prefix`` supplies them: these *do*
      influence later positions, so without a prefix the replay is exact only from
      ``prompt_start`` on. ``prefix`` = the rows of an earlier request covering
      positions 0 .. prompt_start − 1 (multi-turn: the previous turn's
      routed_experts, whose prompt_start choice makes the rows abut).

    Raises ``RoutingMismatch`` if ``routed`` is not [rows, L, k], the row count,
    ``moe_layers`` or ``top_k`` differ, or an id is outside [0, num_experts).
    """
    routed = np.asarray(routed)
    if prompt_len < 1 or response_len < 0:
        raise RoutingMismatch(
            f"need prompt_len ≥ 1 and response_len ≥ 0, got {prompt_len}, {response_len}"
        )
    if not 0 <= prompt_start < prompt_len:
        raise RoutingMismatch(
            f"prompt_start must be in [0, prompt_len={prompt_len}), got {prompt_start}"
        )
    if routed.ndim != 3:
        raise RoutingMismatch(
            f"routed_experts must be [tokens - 1, moe_layers, top_k], got shape {routed.shape}"
        )
    rows, layers, k = routed.shape
    if moe_layers is not None and layers != moe_layers:
        raise RoutingMismatch(f"routed_experts has {layers} MoE layers, the model has {moe_layers}")
    if top_k is not None and k != top_k:
        raise RoutingMismatch(f"routed_experts has top_k={k}, the model has top_k={top_k}")
    if k > num_experts:
        raise RoutingMismatch(f"routed_experts has top_k={k} > num_experts={num_experts}")
    n = prompt_len + response_len
    expected = n - 1 - prompt_start
    if rows != expected:
        raise RoutingMismatch(
            f"routed_experts has {rows} rows; prompt_len={prompt_len} + response_len="
            f"{response_len} − 1 − prompt_start={prompt_start} = {expected} expected"
        )
    ids_np = compact(routed, num_experts)
    dtype = ids_np.dtype
    out = np.empty((n, layers, k), dtype=dtype)
    out[:] = np.arange(k, dtype=dtype)
    mask = np.zeros(n, dtype=bool)
    out[prompt_start : n - 1] = ids_np
    mask[prompt_start : n - 1] = True
    if prefix is not None:
        prefix = np.asarray(prefix)
        if prefix.ndim != 3 or prefix.shape[1:] != (layers, k):
            raise RoutingMismatch(
                f"prefix must be [prompt_start, {layers}, {k}], got shape {prefix.shape}"
            )
        if prefix.shape[0] != prompt_start:
            raise RoutingMismatch(
                f"prefix has {prefix.shape[0]} rows, prompt_start={prompt_start} expected"
            )
        out[:prompt_start] = compact(prefix, num_experts)
        mask[:prompt_start] = True
    return RoutingTrace(torch.from_numpy(out), num_experts, torch.from_numpy(mask))

"""Routing traces: the expert ids of every MoE layer for a sequence or a batch.

``RoutingTrace`` holds ids [*tokens, L, k] (uint8/int16) and an optional mask [*tokens]
(False = no replay ids: the trainer's live router picks). ``align_routing`` maps vLLM's
rows onto the trainer's n = prompt_len + response_len positions: position p uses row
p − prompt_start, and rows = n − 1 − prompt_start (the last position is left unreplayed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from runtime.router_replay.codec import _torch_storage_dtype, compact
from runtime.router_replay.selection import RoutingMismatch

__all__ = ["RoutingTrace", "align_routing"]


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

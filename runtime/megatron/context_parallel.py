"""Context parallelism (CP) for the Megatron trainer, ``cp_comm_type`` "all_gather" style.

Split. A micro-batch's T positions (T a multiple of 2·CP, the trainer pads to it) are cut
into 2·CP chunks of c = T / (2·CP); CP rank r holds chunks r and 2·CP−1−r, concatenated
(Megatron's load-balanced order, ``megatron.core.utils.get_batch_on_this_cp_rank``):
:func:`local_positions`. Tokens, per-token masks and routing-replay traces (R2 / R3 ids are
per token) are split by :func:`split` / :func:`split_trace`; megatron-core's rotary embedding
already takes positions 0..T−1 per CP rank in that order (``get_pos_emb_on_this_cp_rank``,
for RoPE, YaRN and MLA), its MoE routers reduce their statistics over the TP×CP group, its
DDP reduces gradients over the data×context-parallel group and its distributed optimizer
shards over it.

Attention (``runtime.megatron.attention.SDPAttention``). Each rank computes its own queries
(2c rows) against the whole sequence's keys and values: K and V are all-gathered over the CP
group and put back in global order (:func:`gather_sequence`; autograd-aware: the backward sums
the ranks' gradients and keeps this rank's rows, i.e. a reduce-scatter), and the mask is built
from global positions (:func:`causal_mask`: key position > query position is masked; an
explicit megatron mask arrives with its rows already restricted to the local queries). That is
full causal attention restricted to the local rows.

Log-probs (``runtime.megatron.logprobs.megatron_logprobs`` under CP > 1). Position g's logits
predict token g+1, which may live on another rank: the target of each local position is read
from the whole (unsplit) ``input_ids``, the local per-token log-probs and entropies are
all-gathered and put in global order (:func:`gather`). Every CP rank then holds the
micro-batch's whole log-probs and computes the same loss; the gather's backward keeps this
rank's rows without summing (:func:`gather_identical`), so each rank's
gradient is that of its own tokens and megatron's sum over the CP ranks is the whole
gradient. The loss share (token count) is counted on CP rank 0 only, since megatron-core
sums shares over the data×context-parallel group.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from torch import Tensor

from runtime.megatron.parallel import comm_device
from runtime.router_replay import RoutingTrace

__all__ = ["causal_mask", "gather", "gather_identical", "gather_records", "gather_sequence",
           "local_positions", "rank", "size", "split", "split_trace"]


def size() -> int:
    """The context-parallel world size (1 before parallel state is initialised)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def rank() -> int:
    return parallel_state.get_context_parallel_rank() if size() > 1 else 0


def local_positions(length: int, cp: int | None = None, r: int | None = None,
                    device: Any = None) -> Tensor:
    """Global positions of CP rank ``r``'s rows (``length`` / CP of them): chunks r and
    2·CP−1−r of a ``length``-position sequence (module doc)."""
    cp = size() if cp is None else cp
    r = rank() if r is None else r
    if length % (2 * cp):
        raise ValueError(f"context parallelism {cp} splits {length} positions into {2 * cp} "
                         f"chunks: pad them to a multiple of {2 * cp}")
    c = length // (2 * cp)
    return torch.cat([torch.arange(r * c, (r + 1) * c, device=device),
                      torch.arange((2 * cp - 1 - r) * c, (2 * cp - r) * c, device=device)])


def split(t: Tensor, dim: int = 1) -> Tensor:
    """This CP rank's positions of ``t`` along ``dim`` (the whole sequence)."""
    if size() == 1:
        return t
    return t.index_select(dim, local_positions(t.shape[dim], device=t.device))


def split_trace(trace: RoutingTrace | None) -> RoutingTrace | None:
    """A batch routing trace [B, T, L, k] restricted to this CP rank's positions."""
    if trace is None or size() == 1:
        return trace
    return RoutingTrace(split(trace.ids, 1), trace.num_experts,
                        None if trace.mask is None else split(trace.mask, 1))


def _global_order(parts: list[Tensor], dim: int, cp: int) -> Tensor:
    """Ranks' local halves (each [chunk r; chunk 2·CP−1−r] along ``dim``) → global order."""
    chunks: list[Tensor | None] = [None] * (2 * cp)
    for r, part in enumerate(parts):
        first, second = part.chunk(2, dim=dim)
        chunks[r], chunks[2 * cp - 1 - r] = first, second
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def _all_gather(t: Tensor, dim: int) -> Tensor:
    cp, group = size(), parallel_state.get_context_parallel_group()
    src = t.detach().to(comm_device()).contiguous()
    parts = [torch.empty_like(src) for _ in range(cp)]
    torch.distributed.all_gather(parts, src, group=group)
    return _global_order(parts, dim, cp).to(t.device)


class _GatherSum(torch.autograd.Function):
    """All-gather in global order; backward: the ranks' gradients summed, this rank's rows
    (a reduce-scatter): for K and V, which every rank's queries read."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, dim: int) -> Tensor:
        ctx.dim = dim
        return _all_gather(t, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        g = grad.to(comm_device()).contiguous()
        torch.distributed.all_reduce(g, group=parallel_state.get_context_parallel_group())
        return split(g.to(grad.device), ctx.dim), None


class _GatherIdentical(torch.autograd.Function):
    """All-gather in global order; backward: this rank's rows of the gradient, not summed:
    for outputs every CP rank differentiates the same function of (module doc)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, dim: int) -> Tensor:
        ctx.dim = dim
        return _all_gather(t, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return split(grad, ctx.dim), None


def gather_sequence(t: Tensor, dim: int = 0) -> Tensor:
    """This CP rank's positions of the whole sequence (``dim``) gathered from every rank in
    global order; the backward is a reduce-scatter (K and V of :class:`SDPAttention`)."""
    return _GatherSum.apply(t, dim) if size() > 1 else t


def gather_identical(t: Tensor, dim: int) -> Tensor:
    """This CP rank's positions (``dim``) gathered from every rank in global order; the
    backward keeps this rank's rows of the gradient, not summed (log-probs, module doc)."""
    return _GatherIdentical.apply(t, dim)


def gather(t: Tensor, dim: int) -> Tensor:
    """This CP rank's positions (``dim``) gathered from every rank in global order, no
    gradient (entropies)."""
    return _all_gather(t, dim)


_CAUSAL: dict[tuple[int, int, int, Any], Tensor] = {}


def causal_mask(sq: int, device: Any) -> Tensor:
    """megatron's boolean mask [1, 1, sq, sq · CP] (True = masked) of this rank's query
    rows (global positions, :func:`local_positions`) over all keys in global order: causal
    attention restricted to the local rows. The same tensor for every layer (the additive-mask
    cache of ``runtime.megatron.attention`` keys on its identity); only the last shape is
    kept. On GPUs this is the masked (memory-efficient) kernel, not flash: s²/CP mask
    elements per rank, boolean and additive (``compiler.estimates`` counts them)."""
    cp, r = size(), rank()
    key = (sq, cp, r, str(device))
    got = _CAUSAL.get(key)
    if got is None:
        rows = local_positions(sq * cp, cp, r, device=device)
        keys = torch.arange(sq * cp, device=device)
        _CAUSAL.clear()  # the last shape only: lengths vary between micro-batches
        got = _CAUSAL[key] = (keys[None, :] > rows[:, None])[None, None]
    return got


def gather_records(records: list[Tensor], batch: int) -> list[Tensor]:
    """R2 records of this rank's positions (per MoE layer [2c · B, k], sequence-major, see
    ``runtime.megatron.replay``) → the whole sequence's [T · B, k], in global order."""
    if size() == 1:
        return records
    return [_all_gather(r.view(-1, batch, r.shape[-1]), 0).reshape(-1, r.shape[-1])
            for r in records]

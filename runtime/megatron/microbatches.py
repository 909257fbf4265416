"""Padding of the Megatron trainer's micro-batches to the shapes every rank shares.

Expert parallelism all-gathers tokens in every MoE layer and pipeline stages exchange
activations of one fixed shape, so ``MegatronTrainer._shard`` gives every rank micro-batches
of equal shapes (the max over ranks: ``runtime.megatron.parallel.all_max``). Here:
:func:`pad_columns` right-pads a micro-batch to a length (padding is masked out everywhere),
:func:`pad_rows` adds dummy rows (one attended token, no loss) up to a row count; routing
traces get filler experts 0..k−1 where they have no replay ids.
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.router_replay import RoutingTrace
from runtime.trainer import TrainBatch

__all__ = ["dummy_loss", "pad_columns", "pad_rows"]


def dummy_loss(output: Tensor) -> tuple[Tensor, Tensor, dict]:
    """The loss of a micro-batch of dummy rows only, in megatron-core's ``loss_func`` form:
    zero, counting nothing, yet connected to ``output`` (its backward must still run: the MoE
    layers' collectives wait for every rank)."""
    return output.sum() * 0.0, torch.tensor(0, dtype=torch.int), {}


def _filler(trace: RoutingTrace, rows: int, length: int) -> Tensor:
    """Routing ids 0..k−1 for positions that have no replay ids (padding, dummy rows)."""
    k = trace.top_k
    return torch.arange(k, dtype=trace.ids.dtype).expand(rows, length, trace.num_layers, k)


def _trace_mask(trace: RoutingTrace) -> Tensor:
    return trace.mask if trace.mask is not None else torch.ones(trace.token_shape, dtype=torch.bool)


def pad_columns(mb: TrainBatch, length: int) -> TrainBatch:
    """Right-pad a micro-batch to ``length`` positions (padding is masked out everywhere)."""
    extra = length - mb.input_ids.shape[1]
    if extra <= 0:
        return mb

    def pad(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, extra))

    routing = mb.routing
    if routing is not None:
        routing = RoutingTrace(torch.cat([routing.ids, _filler(routing, mb.size, extra)], 1),
                               routing.num_experts, pad(_trace_mask(routing)))
    adv = mb.advantages if mb.advantages.dim() == 1 else pad(mb.advantages)
    return TrainBatch(pad(mb.input_ids), pad(mb.attention_mask), pad(mb.loss_mask),
                      pad(mb.rollout_logp), adv, routing)


def pad_rows(real: TrainBatch | None, batch: TrainBatch, rows: int, length: int) -> TrainBatch:
    """``real`` plus dummy rows up to ``rows``: one attended token (no empty softmax), no loss,
    filler routing."""
    extra = rows - (0 if real is None else real.size)
    attn = torch.zeros(extra, length, dtype=batch.attention_mask.dtype)
    attn[:, 0] = 1
    routing = None
    if batch.routing is not None:
        routing = RoutingTrace(_filler(batch.routing, extra, length).clone(),
                               batch.routing.num_experts,
                               torch.zeros(extra, length, dtype=torch.bool))
    dummy = TrainBatch(
        torch.zeros(extra, length, dtype=batch.input_ids.dtype), attn,
        torch.zeros(extra, length, dtype=batch.loss_mask.dtype),
        torch.zeros(extra, length, dtype=batch.rollout_logp.dtype),
        torch.zeros((extra, length) if batch.advantages.dim() == 2 else (extra,),
                    dtype=batch.advantages.dtype), routing)
    if real is None:
        return dummy
    if routing is not None:
        assert real.routing is not None
        routing = RoutingTrace(torch.cat([real.routing.ids, routing.ids]), routing.num_experts,
                               torch.cat([_trace_mask(real.routing), _trace_mask(routing)]))
    return TrainBatch(*(torch.cat([a, b]) for a, b in (
        (real.input_ids, dummy.input_ids), (real.attention_mask, dummy.attention_mask),
        (real.loss_mask, dummy.loss_mask), (real.rollout_logp, dummy.rollout_logp),
        (real.advantages, dummy.advantages))), routing)

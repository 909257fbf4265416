"""Per-token log-probs and entropies of a megatron-core GPTModel, from vocab-parallel logits.

They follow ``runtime.trainer.sequence_logprobs``: logp[b, t] = log π(x_t | x_<t), position 0
is 0; computed from the vocab-parallel logits with
``tensor_parallel.vocab_parallel_cross_entropy`` (logp = −CE), entropy
H = log Z − Σ_v p_v z_v with max / sums all-reduced over the tensor-parallel group.
:func:`megatron_logprobs` passes no attention mask for right-padded batches (causal
attention: flash kernels on GPUs). Under context parallelism (CP > 1) each rank runs its own
positions and gets the whole log-probs back (:func:`_context_parallel_logprobs`, built on the
gathers of :mod:`runtime.megatron.context_parallel`).

megatron-core's ``vocab_parallel_cross_entropy`` overwrites its input with probabilities, and
its input is the logits themselves wherever ``.float()`` copies nothing (fp32 logits) and
``.contiguous()`` nothing either (bf16 logits, or a one-row batch): entropies are taken first.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from runtime.megatron import context_parallel

__all__ = ["megatron_logprobs"]


def _attention_mask(attention_mask: Tensor) -> Tensor | None:
    """Megatron's boolean mask [B, 1, T, T], True = masked: causal ∪ padded keys; None (causal
    attention, no mask: flash kernels on GPUs) when every row is right-padded, as the trainer's
    batches are. A real token's keys are then all real, so only padding positions, whose
    outputs are never read, attend differently (to the padding before them)."""
    m = attention_mask.bool()
    if bool((m[:, 1:] <= m[:, :-1]).all()):
        return None
    return _padding_mask(attention_mask)


def _padding_mask(attention_mask: Tensor) -> Tensor:
    """Megatron's boolean mask [B, 1, T, T], True = masked: causal ∪ padded keys."""
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    return ~allowed[:, None]


def _not_counted(attention_mask: Tensor) -> Tensor:
    """True where a token is not one the routers count: padding, and the dummy rows'
    one attended token (``runtime.megatron.microbatches.pad_rows``; a row of one token
    predicts nothing, so no trained or probed row has only one)."""
    m = attention_mask.bool()
    return ~m | (m.sum(1, keepdim=True) < 2)


def _routing_padding(model: Any, padding: Tensor) -> Tensor:
    """megatron-core's MoE ``padding_mask`` (True = padding) for this stage: the routers then
    count only real tokens for the expert-bias update (padding and dummy rows would all go
    to the replay's filler experts 0..k−1). The first stage splits it over the
    tensor-parallel ranks under sequence parallelism itself; a later stage gets it split as
    its hidden states are."""
    inner = getattr(model, "module", model)
    if not inner.pre_process and model.config.sequence_parallel:
        padding = tensor_parallel.scatter_to_sequence_parallel_region(
            padding.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
    return padding


def megatron_logprobs(model: GPTModel, input_ids: Tensor, attention_mask: Tensor, *,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies) [B, T] — ``runtime.trainer.sequence_logprobs``'s
    convention: logp[b, t] = log softmax(z_{b, t−1})[x_{b, t}], position 0 is 0.

    ``z`` are this rank's vocab shard [B, T, V/tp]; logp = −``vocab_parallel_cross_entropy``.
    Entropy (no grad): H = log Z − Σ_v softmax(z)_v z_v with log Z = m + log Σ exp(z − m),
    m, Σ all-reduced over the tensor-parallel group. Padded keys are masked out. The
    positions passed are cumsum(mask) − 1, but megatron-core's RoPE rotates by 0 … T−1
    whatever they say (it takes only the sequence length): a left-padded row's tokens are
    shifted by a constant, which rotary attention, relative by construction, does not see.
    """
    if context_parallel.size() > 1:  # this rank's positions; log-probs gathered whole
        return _context_parallel_logprobs(model, input_ids, attention_mask,
                                          with_entropy=with_entropy)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if model.config.sequence_parallel and input_ids.shape[1] % tp:
        raise ValueError(f"sequence parallelism splits the {input_ids.shape[1]} positions over "
                         f"{tp} tensor-parallel ranks: pad them to a multiple of {tp}")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, position_ids=position_ids,
                   attention_mask=_attention_mask(attention_mask),
                   padding_mask=_routing_padding(model, _not_counted(attention_mask)))  # [B, T, V/tp]
    if not getattr(model, "module", model).post_process:
        return logits, None  # a stage before the last: hidden states for the next stage
    z = logits[:, :-1].float()
    target = input_ids[:, 1:]
    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    entropy = None
    if with_entropy:  # first: the cross entropy below overwrites z (module doc)
        entropy = torch.zeros_like(logp)
        with torch.no_grad():
            entropy[:, 1:] = _vocab_parallel_entropy(z)
    # vocab_parallel_cross_entropy is [s, b] or [b, s] agnostic: it works on the last dim.
    logp[:, 1:] = -tensor_parallel.vocab_parallel_cross_entropy(z.contiguous(), target)
    return logp, entropy


def _vocab_parallel_entropy(z: Tensor) -> Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    distributed = parallel_state.get_tensor_model_parallel_world_size() > 1
    m = z.max(-1, keepdim=True).values
    if distributed:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(z - m)
    sums = torch.stack([e.sum(-1), (e * z).sum(-1)])
    if distributed:
        torch.distributed.all_reduce(sums, group=group)
    s, ez = sums[0], sums[1]
    return m.squeeze(-1) + torch.log(s) - ez / s


def _context_parallel_logprobs(model: Any, input_ids: Tensor, attention_mask: Tensor, *,
                               with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`megatron_logprobs` under CP > 1: the forward runs on this rank's positions, the
    per-token log-probs [B, T] (and entropies) come back whole on every CP rank
    (:mod:`runtime.megatron.context_parallel`'s module doc). Before the last pipeline stage:
    the stage's local hidden states."""
    b, t = input_ids.shape
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = context_parallel.size()
    if model.config.sequence_parallel and t % (2 * cp * tp):
        raise ValueError(f"sequence parallelism with CP {cp} splits the {t} positions into "
                         f"{2 * cp * tp} pieces: pad them to a multiple of {2 * cp * tp}")
    rows = context_parallel.local_positions(t, device=input_ids.device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    mask = _attention_mask(attention_mask)
    if mask is not None:  # [B, 1, T, T] → this rank's query rows
        mask = mask.index_select(2, rows)
    logits = model(input_ids=input_ids.index_select(1, rows),
                   position_ids=position_ids.index_select(1, rows), attention_mask=mask,
                   padding_mask=_routing_padding(
                       model, _not_counted(attention_mask).index_select(1, rows)))
    if not getattr(model, "module", model).post_process:
        return logits, None
    z = logits.float()  # [B, 2c, V/tp]: position g predicts token g + 1
    last = rows == t - 1
    target = input_ids.index_select(1, (rows + 1).clamp(max=t - 1))
    logp = torch.zeros(b, t, dtype=torch.float32, device=input_ids.device)
    entropy = None
    if with_entropy:  # first: the cross entropy below overwrites z (module doc)
        entropy = torch.zeros_like(logp)
        with torch.no_grad():
            entropy[:, 1:] = context_parallel.gather(_vocab_parallel_entropy(z), 1)[:, :-1]
    nll = tensor_parallel.vocab_parallel_cross_entropy(z, target)
    local = torch.where(last, torch.zeros_like(nll), -nll)
    logp[:, 1:] = context_parallel.gather_identical(local, 1)[:, :-1]
    return logp, entropy

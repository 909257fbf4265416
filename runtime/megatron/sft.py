"""The supervised (SFT) step on the Megatron-core trainer: the embedded SFT's loss, sharded.

For a batch of ``prompt → answer <eos>`` sequences (``runtime.jobs.sft.encode_pairs``) with
``loss_mask`` on the answer and eos positions:

    loss = − (1/N) Σ_b Σ_{t: mask_{b,t}} log π(x_{b,t} | x_{b,<t}),   N = Σ mask

one optimizer step per batch. The micro-batches are split over the data-parallel ranks and
padded exactly as the RL update's (``MegatronTrainer._shard``); each micro-batch's loss
function returns its NLL *sum* and its token count, and megatron-core's
``calculate_per_token_loss`` divides the summed gradients by the all-reduced count, so the
gradient is the whole batch's token mean whatever the micro-batch size, DP, PP or CP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from runtime.megatron import context_parallel
from runtime.megatron.logprobs import megatron_logprobs
from runtime.megatron.microbatches import dummy_loss
from runtime.trainer import TrainBatch

__all__ = ["sft_batch", "sft_step"]


def sft_batch(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> TrainBatch:
    """The trainer's batch of SFT sequences (no rollout log-probs, advantages or routing)."""
    zeros = torch.zeros(input_ids.shape, dtype=torch.float32)
    return TrainBatch(input_ids, attention_mask, loss_mask, zeros, zeros[:, 0].clone())


def sft_step(trainer: Any, batch: TrainBatch) -> dict[str, float]:
    """One optimizer step of ``trainer`` (a ``MegatronTrainer``) on the SFT loss (module
    doc). Collective: every rank calls it with the same batch. Returns the batch's mean
    NLL (``loss``), its gradient norm and learning rate, the same on every rank."""
    lr = trainer._lr()
    for ddp in trainer.ddp_chunks:
        ddp.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    trainer.model.train()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    rows = torch.arange(batch.size)
    micro = list(trainer._shard(rows, batch))

    def forward_step(data: Iterator[Any], model: Any) -> tuple[Tensor, Any]:
        index, real, padded = next(data)
        logp, _ = megatron_logprobs(model, padded.input_ids.to(trainer.device),
                                    padded.attention_mask.to(trainer.device))

        def loss_func(output: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
            n = len(index)
            if not n:
                return dummy_loss(output)
            width = real.input_ids.shape[1]
            mask = real.loss_mask.to(output.device)
            nll = -(output[:n, :width] * mask).sum()
            tokens = int(real.loss_mask.sum()) if context_parallel.rank() == 0 else 0
            sums["loss"] = sums.get("loss", 0.0) + float(nll.detach()) * (tokens > 0)
            counts["loss"] = counts.get("loss", 0.0) + tokens
            return nll, torch.tensor(tokens, dtype=torch.int), {}

        return logp, loss_func

    trainer._schedule(trainer.ddp_chunks, micro, forward_step, forward_only=False)
    _, grad_norm, _ = trainer.optimizer.step()
    trainer.optimizer_steps += 1
    trainer._reduce_metrics(sums, counts)
    loss = sums.get("loss", 0.0) / max(counts.get("loss", 0.0), 1.0)
    return {"loss": loss, "grad_norm": float(grad_norm or 0.0), "lr": lr}

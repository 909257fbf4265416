"""The Megatron-core trainer: ``runtime.trainer.Trainer``'s RL step on a megatron-core GPTModel.

Same algorithm, same losses (``runtime.losses.compute_loss`` through ``Trainer._micro_loss``),
same metrics; what changes is where the work runs:

* the model is megatron-core's ``DistributedDataParallel`` over the GPTModel of
  ``runtime.megatron.model``, the optimizer ``get_megatron_optimizer`` (Adam; the distributed
  optimizer shards its state over data-parallel ranks when ``train.optimizer.distributed``);
* each optimizer step runs ``get_forward_backward_func()`` over this data-parallel rank's
  micro-batches with ``calculate_per_token_loss``: a micro-batch's loss function returns the
  loss *sum* (loss · share) and its share (tokens or responses); ``finalize_model_grads``
  sums the gradients over data-parallel ranks and divides by the all-reduced share, so the
  gradient is the mini-batch loss's exactly as in the embedded trainer, whatever the
  micro-batch size or data-parallel degree;
* micro-batches of a mini-batch (length-balanced as in ``Trainer``) go round-robin to the
  data-parallel ranks. Every rank runs the same number of forwards on equal shapes, padded
  (all-reduced max rows × length; dummy rows carry no loss: ``runtime.megatron.microbatches``):
  expert parallelism all-gathers tokens in every MoE layer, which needs equal token counts
  across ranks;
* the old-policy pass is split the same way and its log-probs, entropies and (R2) recorded
  experts are summed over data-parallel ranks, so every rank holds the whole batch's;
* router replay is megatron-core's ``RouterReplay`` (``runtime.megatron.replay``): R2 records
  in the old-policy pass, R3 and R2 replay in the update;
* checkpoints are megatron-core's ``dist_checkpointing`` (Adam's ``step`` restored by
  ``runtime.megatron.checkpoint.set_adam_step``);
* the batch and all bookkeeping stay on the CPU, as in ``Trainer``; only the forward runs on
  the model's device (its log-probs, ``runtime.megatron.logprobs``, come back
  differentiably), and collective tensors go to the GPU under NCCL. Tested on CPU (gloo) only.

Tensor parallelism trains with sequence parallelism (megatron-core's MoE layer requires it):
micro-batches are padded to a multiple of TP positions, the norms are
``runtime.megatron.model.SequenceParallelRMSNorm`` and replay targets are sharded by
sequence (``runtime.megatron.replay``); any EP and expert-tensor size go with it (experts'
gradients are reduced over the expert data-parallel group, also at EP = 1:
``runtime.megatron.model._mark_tensor_parallel``). Pipeline parallelism runs megatron-core's 1F1B
schedule for the update and forward-only for the old-policy and reference passes; every
micro-batch of a pass then has one shape, stages replay / record their own MoE layers, and
the loss and its metrics live on the last stage (its log-probs are summed to all stages).
Virtual pipeline stages (``build_gpt_chunks``) run the interleaved schedule over this rank's
model chunks, each a DDP of its own; every chunk reads every micro-batch and replays or
records its own routers (``MegatronReplay``'s ``instances``). Uneven first/last stages are
the chunks' ``TransformerConfig`` (``runtime.megatron.args.pipeline_stages``).
Context parallelism (``runtime.megatron.context_parallel``): every micro-batch is padded to a
multiple of 2·CP (× TP) positions, each CP rank runs its two chunks and gets the whole
log-probs back, replay traces are split alike (R2 records gathered), and the loss share is
counted on CP rank 0 (megatron-core sums it over data × context-parallel ranks).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from runtime.losses import aggregate
from runtime.megatron import context_parallel
from runtime.megatron.checkpoint import set_adam_step
from runtime.megatron.logprobs import megatron_logprobs
from runtime.megatron.microbatches import dummy_loss, pad_columns, pad_rows
from runtime.megatron.parallel import all_max, comm_device
from runtime.megatron.replay import MegatronReplay, from_megatron_layout, router_layers
from runtime.router_replay import RoutingTrace
from runtime.trainer import StepTensors, TrainBatch, Trainer

__all__ = ["MegatronTrainer"]

# The distributed optimizer's shards saved as they are: parallel save and load, reshardable
# over data-parallel ranks ("fully_reshardable" would also allow other TP/PP/EP layouts).
_CKPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronTrainer(Trainer):
    """Applies the spec's ``algorithm`` to a megatron-core GPTModel, one RL step at a time.

    ``model`` is this rank's shard (``build_gpt_model``, with ``routing_replay=True`` for
    r2/r3), or its model chunks under virtual pipeline stages (``build_gpt_chunks``: the
    interleaved 1F1B schedule); parallel state must be initialised. ``algorithm`` / ``train``
    as for ``Trainer``; ``reference``: the frozen KL reference, a GPTModel (or chunks) of the
    same layout built without routing replay (it routes freely).
    """

    def __init__(self, model: GPTModel | list[GPTModel], *, algorithm: dict[str, Any],
                 train: dict[str, Any], vocab_size: int, replay_mode: str = "off",
                 reference: GPTModel | list[GPTModel] | None = None,
                 total_optimizer_steps: int = 1, length_balancing: bool = True,
                 sync_tolerance: float | None = None) -> None:
        self.chunks = list(model) if isinstance(model, list | tuple) else [model]
        config = self.chunks[0].config
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1 and config.num_moe_experts and not config.sequence_parallel:
            raise ValueError("megatron-core trains an MoE model under tensor parallelism only "
                             "with sequence parallelism: build it with sequence_parallel=True")
        if replay_mode != "off" and not config.num_moe_experts:
            raise ValueError(f"router replay {replay_mode} on a dense model: it has no routers")
        distributed = bool(train["optimizer"]["distributed"])
        ddps = []
        for chunk in self.chunks:  # gradients summed, not averaged: set before DDP
            chunk.config.calculate_per_token_loss = True
            # bf16 weights accumulate and reduce their gradients in fp32, as Megatron-LM forces
            # for --bf16 (--accumulate-allreduce-grads-in-fp32) and compiler.estimates counts.
            ddps.append(DistributedDataParallel(
                config=chunk.config, module=chunk,
                ddp_config=DistributedDataParallelConfig(
                    use_distributed_optimizer=distributed,
                    grad_reduce_in_fp32=bool(chunk.config.bf16))))
        self.ddp_chunks = ddps
        for chunk in self.chunks:  # the schedule reads the first chunk's
            chunk.config.finalize_model_grads_func = finalize_model_grads
            chunk.config.no_sync_func = ([d.no_sync for d in ddps] if len(ddps) > 1
                                         else ddps[0].no_sync)
        if len(self.chunks) > 1 and parallel_state.get_pipeline_model_parallel_world_size() == 2:
            # Interleaved with PP 2, each rank's previous and next stage are the same rank and
            # both messages of a step have one shape: batched, megatron-core posts the sends
            # as [prev, next] and the receives as [prev, next] on both ranks, so the peer
            # takes the gradient for the activation and vice versa (measured on gloo). The
            # unbatched path orders them by rank parity.
            for chunk in self.chunks:
                chunk.config.batch_p2p_comm = False
        self.module = self.chunks[0]
        self.device = next(self.module.parameters()).device
        self.distributed_optimizer = distributed
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp = parallel_state.get_data_parallel_world_size()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        # sequence parallelism splits each micro-batch's positions over the TP ranks
        self.length_multiple = tp if config.sequence_parallel else 1
        self.cp = context_parallel.size()  # 2·CP chunks per sequence (context_parallel)
        self.length_multiple *= 2 * self.cp if self.cp > 1 else 1
        freq = config.moe_layer_freq
        pattern = freq if isinstance(freq, list) else [
            int(i % freq == 0) for i in range(config.num_layers)]
        self.moe_layers = sum(pattern) if config.num_moe_experts else 0  # in the whole model
        replay = None
        # per DDP chunk: the positions of its routers among RouterReplay's instances (the
        # interleaved schedule runs one chunk per forward step, which replays its own only)
        self.routers: dict[int, list[int] | None] = {id(d): None for d in ddps}
        if replay_mode != "off":
            layers = router_layers(self.chunks, pattern)
            replay = MegatronReplay(sequence_parallel=bool(config.sequence_parallel),
                                    total_layers=self.moe_layers,
                                    layers=[layer for chunk in layers for _, layer in chunk])
            if len(ddps) > 1:
                self.routers = {id(d): [pos for pos, _ in chunk]
                                for d, chunk in zip(ddps, layers, strict=True)}
        self.reference_chunks = (None if reference is None else list(reference)
                                 if isinstance(reference, list | tuple) else [reference])
        super().__init__(ddps[0] if len(ddps) == 1 else torch.nn.ModuleList(ddps),
                         algorithm=algorithm, train=train, vocab_size=vocab_size,
                         replay_mode=replay_mode, replay=replay,  # type: ignore[arg-type]
                         reference=reference,  # type: ignore[arg-type]
                         total_optimizer_steps=total_optimizer_steps,
                         length_balancing=length_balancing, sync_tolerance=sync_tolerance)

    # ------------------------------------------------------------------ engine hooks

    def _build_optimizer(self) -> Any:
        """megatron-core's optimizer; with ``cpu_offload`` its ``HybridDeviceOptimizer``
        (``--optimizer-cpu-offload``): the distributed optimizer's fp32 main-weight shards
        stay on the GPU, a share ``offload_fraction`` of them is copied to host memory where
        torch's AdamW steps them (moments in host memory), and the result is copied back.
        ``use_precision_aware_optimizer``, which Megatron-LM pairs with the offload to drop
        the GPU's main-weight shards too, needs TransformerEngine in megatron-core 0.16.1
        (``OptimizerConfig`` reads its version): not set. The hybrid optimizer needs CUDA
        (streams, pinned memory): ``runtime.capabilities.optimizer_offload`` refuses it on
        the CPU."""
        opt, config = self.opt_cfg, self.module.config
        offload = bool(opt.get("cpu_offload", False))
        return get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=opt["lr"], min_lr=opt["min_lr"],
                            weight_decay=opt["weight_decay"], adam_beta1=opt["adam_beta1"],
                            adam_beta2=opt["adam_beta2"], adam_eps=opt["adam_eps"],
                            clip_grad=opt["clip_grad"], bf16=bool(config.bf16),
                            params_dtype=config.params_dtype,
                            use_distributed_optimizer=self.distributed_optimizer,
                            optimizer_cpu_offload=offload,
                            optimizer_offload_fraction=(float(opt.get("offload_fraction", 1.0))
                                                        if offload else 0.0)),
            self.ddp_chunks)

    def _lr(self) -> float:
        """``Trainer``'s schedule; weight decay per group as megatron's own scheduler sets it
        (``wd_mult`` 0 for biases and 1-D parameters, the groups ``Trainer`` also exempts)."""
        lr = super()._lr()
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.opt_cfg["weight_decay"] * group.get("wd_mult", 1.0)
        return lr

    def _reduce_metrics(self, sums: dict[str, float], counts: dict[str, float]) -> None:
        """Merged over data-parallel ranks (``runtime.losses.aggregate``); the loss metrics exist
        on the last pipeline stage (where the loss runs), and every stage takes its numbers."""
        if self.dp > 1:
            gathered: list[Any] = [None] * self.dp
            torch.distributed.all_gather_object(gathered, (sums, counts), group=self.dp_group)
            sums.clear()
            counts.clear()
            for rank_sums, rank_counts in gathered:
                aggregate.merge(sums, counts, rank_sums, rank_counts)
        if self.pp > 1:
            stages: list[Any] = [None] * self.pp
            torch.distributed.all_gather_object(
                stages, (dict(sums), dict(counts)),
                group=parallel_state.get_pipeline_model_parallel_group())
            sums.clear()
            counts.clear()
            sums.update(stages[-1][0])
            counts.update(stages[-1][1])

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """A Megatron distributed checkpoint (``dist_checkpointing``) of model and optimizer
        state (the distributed optimizer's shards included) and the optimizer-step count.
        Collective: every rank calls it with the same (shared) directory, which must exist."""
        model_sd = self._sharded_state_dict()
        dist_checkpointing.save({"model": model_sd,
                                 "optimizer": self.optimizer.sharded_state_dict(
                                     model_sd, metadata=_CKPT_METADATA),
                                 "optimizer_steps": self.optimizer_steps}, os.fspath(directory))

    def load_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Restore what :meth:`save_checkpoint` wrote (collective)."""
        set_adam_step(self.optimizer, 0)
        model_sd = self._sharded_state_dict()
        state = dist_checkpointing.load(
            {"model": model_sd, "optimizer": self.optimizer.sharded_state_dict(
                model_sd, is_loading=True, metadata=_CKPT_METADATA), "optimizer_steps": 0},
            os.fspath(directory))
        with torch.no_grad():  # fp32 main params are views of the parameters themselves
            if len(self.chunks) == 1:
                self.module.load_state_dict(state["model"])
            else:
                for i, chunk in enumerate(self.chunks):
                    chunk.load_state_dict(state["model"][f"chunk{i}"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer_steps = int(state["optimizer_steps"])
        set_adam_step(self.optimizer, self.optimizer_steps)  # not restored by the loader

    def _sharded_state_dict(self) -> dict[str, Any]:
        """The model's sharded state dict; with model chunks one per chunk (``chunk<i>``):
        the checkpoint's tensors are keyed by their global names either way."""
        if len(self.chunks) == 1:
            return self.module.sharded_state_dict()
        return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(self.chunks)}

    # ------------------------------------------------------------------ data-parallel split

    def _shard(self, rows: Tensor, batch: TrainBatch) -> Iterator[tuple[Tensor, TrainBatch,
                                                                        TrainBatch]]:
        """This rank's micro-batches of ``rows``: (index, real, padded) — ``real`` the rows
        ``index`` padded to the common length, ``padded`` that plus dummy rows up to the
        common row count and, under sequence parallelism, columns up to a multiple of TP.
        Every rank yields the same number, with the same shapes."""
        micro = list(self._micro_batches(rows, batch))
        mine = micro[self.dp_rank::self.dp]
        count = all_max([len(mine)])[0]
        if len(self.chunks) > 1:  # the interleaved schedule runs at least PP micro-batches
            count = max(count, self.pp)
        indices = [mine[i] if i < len(mine) else rows[:0] for i in range(count)]
        shapes = all_max([v for index in indices for v in (
            len(index), int(batch.attention_mask[index].sum(1).max()) if len(index) else 1)])
        if self.pp > 1:  # pipeline stages exchange activations of one fixed shape
            shapes = [max(shapes[0::2]), max(shapes[1::2])] * count
        for i, index in enumerate(indices):
            n_rows, length = shapes[2 * i], shapes[2 * i + 1]
            width = -(-length // self.length_multiple) * self.length_multiple
            real = pad_columns(batch.select(index), length) if len(index) else None
            wide = None if real is None else pad_columns(real, width)
            yield index, real, pad_rows(wide, batch, n_rows, width)  # type: ignore[misc]

    def _old_pass(self, batch: TrainBatch) -> tuple[Tensor, Tensor, TrainBatch]:
        """``Trainer._old_pass`` split over data-parallel ranks, then summed over them."""
        B, T = batch.input_ids.shape
        old = torch.zeros(B, T)
        ent = torch.zeros(B, T)
        r2 = self.replay_mode == "r2"
        layers = self.moe_layers if r2 else 0
        top_k = int(self.module.config.moe_router_topk or 1)
        ids = torch.zeros(B, T, layers, top_k, dtype=torch.long)  # expert id + 1; 0 = none
        self.model.eval()

        def forward_step(data: Iterator[Any], model: Any) -> tuple[Tensor, Any]:
            index, _, mb = next(data)
            n, width = len(index), mb.input_ids.shape[1]
            length = min(width, T)  # beyond T: padding to a multiple of TP
            args = (model, mb.input_ids.to(self.device), mb.attention_mask.to(self.device))
            routers = self.routers[id(model)]
            if r2:
                with self.replay.recording(routers) as records:  # type: ignore[union-attr]
                    out, h = megatron_logprobs(*args, with_entropy=True)
                if records:
                    got = from_megatron_layout(context_parallel.gather_records(records, mb.size),
                                               mb.size, width)
                    chosen = range(len(self.replay)) if routers is None else routers  # type: ignore[arg-type]
                    for j, i in enumerate(chosen):  # this chunk's MoE layers
                        ids[index, :length, self.replay.layers[i]] = (  # type: ignore[union-attr]
                            got[:n, :length, j].long().cpu() + 1)
            elif self.replay_mode != "off" and mb.routing is not None:
                trace = context_parallel.split_trace(mb.routing)
                with self.replay.replaying(trace, instances=routers):  # type: ignore[union-attr, arg-type]
                    out, h = megatron_logprobs(*args, with_entropy=True)
            else:
                out, h = megatron_logprobs(*args, with_entropy=True)

            def keep(output: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:  # last stage
                old[index, :length] = output[:n, :length].cpu()
                ent[index, :length] = h[:n, :length].cpu()  # type: ignore[index]
                return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

            return out, keep

        self._forward_only(self.ddp_chunks, batch, forward_step)
        old, ent, ids = self._sum_over_ranks(old, ent, ids)
        if self.replay_mode == "r2":
            recorded = torch.where(ids > 0, ids - 1, torch.arange(top_k).expand_as(ids))
            batch = replace(batch, routing=RoutingTrace(
                recorded, int(self.module.config.num_moe_experts), mask=None))
        return old, ent, batch

    def _reference_logp(self, batch: TrainBatch) -> Tensor:
        """Log-probs of the frozen reference GPTModel (routing freely, as the embedded
        trainer's reference does), split over data-parallel ranks like the old-policy pass."""
        B, T = batch.input_ids.shape
        ref = torch.zeros(B, T)

        def forward_step(data: Iterator[Any], model: Any) -> tuple[Tensor, Any]:
            index, _, mb = next(data)
            length = min(mb.input_ids.shape[1], T)
            out, _ = megatron_logprobs(model, mb.input_ids.to(self.device),
                                       mb.attention_mask.to(self.device))

            def keep(output: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:  # last stage
                ref[index, :length] = output[: len(index), :length].cpu()
                return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

            return out, keep

        self._forward_only(self.reference_chunks, batch, forward_step)
        (ref,) = self._sum_over_ranks(ref)
        return ref

    def _forward_only(self, model: list[Any], batch: TrainBatch, forward_step: Any) -> None:
        """A no-grad pass of ``model`` over the whole batch, this rank's share of it."""
        with torch.no_grad():
            self._schedule(model, list(self._shard(torch.arange(batch.size), batch)),
                           forward_step, forward_only=True)

    def _schedule(self, chunks: list[Any], micro: list[Any], forward_step: Any, *,
                  forward_only: bool) -> None:
        """megatron-core's schedule (1F1B across pipeline stages, interleaved over model
        chunks) over ``micro``, which ``_shard`` made of equal shapes on every rank. Each chunk
        reads every micro-batch (positions, mask and routing; the first also the tokens).
        The interleaved schedule runs groups of ``microbatch_group_size_per_vp_stage``
        micro-batches per chunk, which must be ≥ PP and leave no remainder below PP:
        PP when it divides the count, else all of them in one group."""
        data: Any = iter(micro)
        if len(chunks) > 1:
            n = len(micro)
            chunks[0].config.microbatch_group_size_per_vp_stage = (
                self.pp if n % self.pp == 0 else n)
            data = [iter(micro) for _ in chunks]
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=chunks,
            num_microbatches=len(micro), seq_length=micro[0][2].input_ids.shape[1],
            micro_batch_size=micro[0][2].size, forward_only=forward_only)

    def _sum_over_ranks(self, *tensors: Tensor) -> list[Tensor]:
        """Each tensor summed over the data-parallel ranks (each filled its own rows) and the
        pipeline stages (the last fills log-probs, each stage its layers' experts)."""
        groups = [g for g, size in ((self.dp_group, self.dp), (
            parallel_state.get_pipeline_model_parallel_group(), self.pp)) if size > 1]
        if not groups:
            return list(tensors)
        device = comm_device()
        summed = []
        for t in tensors:
            t = t.to(device)
            for group in groups:
                torch.distributed.all_reduce(t, group=group)
            summed.append(t.cpu())
        return summed

    # ------------------------------------------------------------------ the update

    @contextmanager
    def _update_routing(self, trace: RoutingTrace | None,
                        routers: list[int] | None = None) -> Iterator[None]:
        """``Trainer._routing`` for a forward whose backward may recompute it (full
        activation recomputation): the recomputed forward replays the same experts.
        ``routers``: the chunk's (``MegatronReplay.replaying``'s ``instances``)."""
        if self.replay_mode == "off" or trace is None:
            yield
            return
        with self.replay.replaying(trace, backward=True,  # type: ignore[union-attr]
                                   instances=routers):
            yield

    def _optimizer_step(self, step: StepTensors, mini: Tensor, sums: dict[str, float],
                        counts: dict[str, float]) -> None:
        batch, mask = step.batch, step.mask
        total_tokens = float(mask[mini].sum())
        denom = max(self._share(mask[mini]), 1.0)
        lr = self._lr()
        for ddp in self.ddp_chunks:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro = list(self._shard(mini, batch))

        def forward_step(data: Iterator[Any], model: Any) -> tuple[Tensor, Any]:
            index, real, padded = next(data)
            with self._update_routing(context_parallel.split_trace(padded.routing),
                                      self.routers.get(id(model))):
                logp, _ = megatron_logprobs(model, padded.input_ids.to(self.device),
                                            padded.attention_mask.to(self.device))

            def loss_func(output: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
                n = len(index)
                if not n:
                    return dummy_loss(output)
                # the loss is computed where the batch lives (differentiably copied there)
                logp = output[:n, : real.input_ids.shape[1]].cpu()
                loss = self._micro_loss(logp, index, real, step, total_tokens, denom, sums,
                                        counts)
                share = self._share(mask[index, : real.input_ids.shape[1]])
                share = share if context_parallel.rank() == 0 else 0  # summed over DP × CP
                return loss.to(output.device), torch.tensor(int(share), dtype=torch.int), {}

            return logp, loss_func

        try:
            self._schedule(self.ddp_chunks, micro, forward_step, forward_only=False)
        finally:
            if self.replay_mode != "off":
                self.replay.finish_backward()  # type: ignore[union-attr]
        _, grad_norm, _ = self.optimizer.step()
        if self.dp_rank == 0:  # the same on every rank: counted once by _reduce_metrics
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm or 0.0)
            counts["grad_norm"] = counts.get("grad_norm", 0.0) + 1.0
            sums["lr"], counts["lr"] = lr, 1.0
        self.optimizer_steps += 1

"""The embedded trainer's update: one RL step on a batch of rollouts (any HF causal LM).

For a batch of B responses (prompt + response tokens, right-padded to T):

1. Old-policy pass (no grad): per-token log-probs ``old_logp`` and entropies of the policy
   as it is before the update, with router replay — R3 replays the experts the rollout
   engine chose; R2 records the experts chosen here and replays them in step 3.
2. Train–inference correction (``runtime.losses.train_inference_correction``) from
   ``old_logp`` and the engine's ``rollout_logp``: TIS weights or an MIS mask.
3. For each PPO epoch, split the B responses (shuffled) into k = max(1, ⌊B / G + ½⌋)
   mini-batches of near-equal size, G = ``global_batch_size``; for each, forward the
   micro-batches with replay, compute the spec's loss from the registry
   (``runtime.losses.compute_loss``), accumulate gradients, clip, take an optimizer step.
   Adaptive group sizes make B vary from step to step: every response is trained on, none
   is trimmed to fit a fixed batch, and an optimizer step sees about G responses.

Micro-batch accumulation is exact, not an average of averages: a token-mean loss
(GRPO, CISPO: Σ m·o / Σ m over the mini-batch) weights each micro-batch's loss by its share
of the mini-batch's tokens; a sequence-mean loss (GSPO, ESPO: mean over responses) by its
share of the mini-batch's non-empty responses. So the gradient does not depend on
``micro_batch_size``.

Share of the gradient from RL-ZVP's reshaped groups (``reshaped_rows``): the mini-batch's
reshaped rows are accumulated first, in micro-batches of their own, so the gradient splits
exactly as g = g_R + g_U without an extra pass, and the step logs
``reshaped_grad_norm_share`` = ‖g_R‖ / ‖g‖ (before clipping; above 1 when the other rows'
gradient partly cancels g_R), averaged over the step's optimizer steps.

Token convention: ``logp[b, t] = log π(x_t | x_<t)`` for t ≥ 1 (position 0 has none);
``entropy[b, t]`` is the entropy of the distribution that predicted ``x_t``.
KL to a frozen reference (``algorithm.kl.coefficient > 0``), per token with d = ref − logp:
k1 = −d, k2 = d²/2, k3 = eᵈ − d − 1 (Schulman's estimators), added as β·token-mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from runtime.losses import aggregate, compute_loss, train_inference_correction
from runtime.router_replay import RouterReplayGroup, RoutingTrace
from runtime.sync_check import check_weight_sync

# How each loss averages (decides the micro-batch weights above).
TOKEN_MEAN_LOSSES = frozenset({"grpo", "cispo"})


@dataclass(frozen=True)
class TrainBatch:
    """B responses, right-padded to T. Position t's token is ``input_ids[b, t]``."""

    input_ids: Tensor  # long [B, T]: prompt + response + padding
    attention_mask: Tensor  # bool [B, T]: real tokens
    loss_mask: Tensor  # bool [B, T]: response tokens (never position 0)
    rollout_logp: Tensor  # float [B, T]: the engine's log-prob of each response token
    advantages: Tensor  # float [B] or [B, T]
    routing: RoutingTrace | None = None  # ids [B, T, L, k] from the engine (R3)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: Tensor) -> TrainBatch:
        """Responses ``index``, trimmed to their longest real length (less padding work)."""
        length = int(self.attention_mask[index].sum(1).max().item()) if len(index) else 1
        routing = None
        if self.routing is not None:
            mask = None if self.routing.mask is None else self.routing.mask[index, :length]
            routing = RoutingTrace(self.routing.ids[index, :length], self.routing.num_experts, mask)
        adv = self.advantages[index]
        return TrainBatch(
            input_ids=self.input_ids[index, :length],
            attention_mask=self.attention_mask[index, :length],
            loss_mask=self.loss_mask[index, :length],
            rollout_logp=self.rollout_logp[index, :length],
            advantages=adv if adv.dim() == 1 else adv[:, :length],
            routing=routing,
        )


def sequence_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies) of ``input_ids`` under ``model``: [B, T] each.

    logp[b, t] = log softmax(z_{b, t−1})[x_{b, t}],  H[b, t] = −Σ_v p_v log p_v of that
    distribution; position 0 is 0. Computed in float32 from the logits.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long()).logits[:, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = input_ids[:, 1:].unsqueeze(-1)
    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    logp[:, 1:] = logprobs.gather(-1, target).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = torch.zeros_like(logp)
        with torch.no_grad():
            entropy[:, 1:] = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL(π‖π_ref) estimate with d = ref_logp − logp (see the module docstring)."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def learning_rate(step: int, *, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from lr to min_lr at ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepTensors:
    """What every optimizer step of one RL step reads: the batch, the old policy's log-probs
    and entropies, the correction's mask and token weights, the reference's log-probs (KL)
    and RL-ZVP's rows (None without them)."""

    batch: TrainBatch
    old_logp: Tensor
    entropy: Tensor
    mask: Tensor
    token_weight: Tensor
    ref_logp: Tensor | None
    reshaped: Tensor | None


class Trainer:
    """Applies the spec's ``algorithm`` to a policy, one RL step at a time.

    ``algorithm`` and ``train`` are the spec's sections as dicts (from the job config);
    ``replay`` the model's RouterReplayGroup (``patch_moe_routers``), required for r2/r3.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        algorithm: dict[str, Any],
        train: dict[str, Any],
        vocab_size: int,
        replay_mode: str = "off",
        replay: RouterReplayGroup | None = None,
        reference: nn.Module | None = None,
        total_optimizer_steps: int = 1,
        length_balancing: bool = True,
        sync_tolerance: float | None = None,
    ) -> None:
        if replay_mode != "off" and not replay:
            raise ValueError(f"router replay {replay_mode!r} needs the model's MoE routers")
        self.model = model
        self.algorithm = algorithm
        self.loss_name = algorithm["loss"]
        self.loss_params = dict(algorithm.get(self.loss_name) or {})
        self.micro = int(train["micro_batch_size"])
        self.global_batch = int(train["global_batch_size"])
        self.vocab_size = vocab_size
        self.replay_mode = replay_mode
        self.replay = replay
        self.reference = reference
        self.length_balancing = length_balancing
        self.sync_tolerance = sync_tolerance  # runtime.sync_check; None: not checked
        opt = train["optimizer"]
        self.opt_cfg = opt
        self.total_optimizer_steps = max(1, total_optimizer_steps)
        self.optimizer = self._build_optimizer()
        self.optimizer_steps = 0

    def _build_optimizer(self) -> Any:
        """AdamW with Megatron's parameter groups: biases and 1-D parameters (norms) get no
        weight decay, every other parameter ``weight_decay``."""
        opt = self.opt_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": opt["weight_decay"]},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=opt["lr"],
                                 betas=(opt["adam_beta1"], opt["adam_beta2"]), eps=opt["adam_eps"])

    def _logprobs(self, input_ids: Tensor, attention_mask: Tensor, *,
                  with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs (and entropies) of the policy (``sequence_logprobs``)."""
        return sequence_logprobs(self.model, input_ids, attention_mask, with_entropy=with_entropy)

    # ------------------------------------------------------------------ replay

    @contextmanager
    def _routing(self, trace: RoutingTrace | None) -> Iterator[None]:
        if self.replay_mode == "off" or trace is None:
            yield
            return
        with self.replay.replaying(trace):  # type: ignore[union-attr]
            yield

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Per-token log-probs [B, T] under the current weights, routing freely (no grad;
        collective on the Megatron trainer): the weight-sync probe's trainer side."""
        zeros = torch.zeros(input_ids.shape, dtype=torch.float32)
        batch = TrainBatch(input_ids, attention_mask, attention_mask.bool(), zeros,
                           zeros[:, 0].clone())
        return self._old_pass(batch)[0]

    def _old_pass(self, batch: TrainBatch) -> tuple[Tensor, Tensor, TrainBatch]:
        """old_logp and entropy of the whole batch, micro-batch by micro-batch (no grad).

        With R2, the experts chosen here become the batch's routing for the update.
        """
        old = torch.zeros_like(batch.rollout_logp)
        ent = torch.zeros_like(batch.rollout_logp)
        traces: list[RoutingTrace] = []
        self.model.eval()
        with torch.no_grad():
            for index in self._micro_batches(torch.arange(batch.size), batch):
                mb = batch.select(index)
                length = mb.input_ids.shape[1]
                if self.replay_mode == "r2":
                    with self.replay.recording() as rec:  # type: ignore[union-attr]
                        logp, h = self._logprobs(mb.input_ids, mb.attention_mask,
                                                 with_entropy=True)
                    ids = rec.trace.ids.reshape(len(index), length, *rec.trace.ids.shape[1:])
                    traces.extend(RoutingTrace(ids[i], rec.trace.num_experts)
                                  for i in range(len(index)))
                else:
                    with self._routing(mb.routing):
                        logp, h = self._logprobs(mb.input_ids, mb.attention_mask,
                                                 with_entropy=True)
                old[index, :length] = logp
                ent[index, :length] = h  # type: ignore[assignment]
        if self.replay_mode == "r2":
            order = torch.cat(list(self._micro_batches(torch.arange(batch.size), batch)))
            by_row = [None] * batch.size
            for row, trace in zip(order.tolist(), traces, strict=True):
                by_row[row] = trace
            stacked = RoutingTrace.stack(by_row, length=batch.input_ids.shape[1])  # type: ignore[arg-type]
            batch = replace(batch, routing=stacked)
        return old, ent, batch

    # ------------------------------------------------------------------ batching

    def _micro_batches(self, rows: Tensor, batch: TrainBatch) -> Iterator[Tensor]:
        """Micro-batches of ``rows``; with length balancing, similar lengths go together."""
        if self.length_balancing:
            lengths = batch.attention_mask[rows].sum(1).cpu()  # rows index on the CPU
            rows = rows[torch.argsort(lengths, stable=True)]
        yield from rows.split(self.micro)

    # ------------------------------------------------------------------ step

    def step(self, batch: TrainBatch, *, epochs: int = 1, seed: int = 0,
             advantages_from_entropy: Callable[[Tensor], Tensor] | None = None,
             version: int = 0, behaviour_version: int | None = None,
             reshaped_rows: Tensor | None = None) -> dict[str, float]:
        """One RL step: old-policy pass, correction, then the optimizer steps. Returns metrics.

        With ``sync_tolerance``, the engine's log-probs of a batch sampled by the weights the
        trainer holds (``behaviour_version`` = ``version``, or None) must equal the
        old-policy pass's within it (``runtime.sync_check``). A batch sampled by older
        weights (bounded staleness) differs by design: its gap is logged, not checked.

        ``advantages_from_entropy`` replaces the batch's advantages by a function of the old
        policy's per-token entropy [B, T] (RL-ZVP's token advantages), computed from the
        old-policy pass this step makes anyway. ``reshaped_rows`` (bool [B]) marks the rows of
        RL-ZVP's groups: the step then logs their share of the gradient norm (module doc)."""
        old_logp, entropy, batch = self._old_pass(batch)
        valid = batch.loss_mask
        n = valid.sum().clamp(min=1)
        gap = float(((old_logp - batch.rollout_logp).abs() * valid).sum() / n)
        on_policy = behaviour_version is None or behaviour_version == version
        if self.sync_tolerance is not None and on_policy:  # before any update uses them
            check_weight_sync(gap, int(valid.sum()), self.sync_tolerance, version)
        if advantages_from_entropy is not None:
            batch = replace(batch, advantages=advantages_from_entropy(entropy))
        corr = self.algorithm["correction"]
        correction = train_inference_correction(
            old_logp, batch.rollout_logp, batch.loss_mask, mode=corr["mode"],
            **{k: corr[k] for k in ("cap", "low", "high") if k in corr})
        mask, token_weight = correction.mask, correction.token_weight
        ref_logp = self._reference_logp(batch) if self._kl_on else None

        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        step = StepTensors(batch, old_logp, entropy, mask, token_weight, ref_logp, reshaped_rows)
        generator = torch.Generator().manual_seed(seed)
        self.model.train()
        for _ in range(epochs):
            order = torch.randperm(batch.size, generator=generator)
            for mini in order.tensor_split(self.mini_batches(batch.size)):
                self._optimizer_step(step, mini, sums, counts)
        self._reduce_metrics(sums, counts)
        metrics = aggregate.result(sums, counts)
        metrics.update(correction.metrics)
        metrics["entropy"] = float((entropy * valid).sum() / n)
        metrics["train_inference_gap"] = gap
        metrics["optimizer_steps"] = float(self.optimizer_steps)
        return metrics

    def _reduce_metrics(self, sums: dict[str, float], counts: dict[str, float]) -> None:
        """Combine the metric sums of all processes that share the step (one here)."""

    def mini_batches(self, responses: int) -> int:
        """Optimizer steps per epoch for ``responses``: B / G rounded half up, at least 1."""
        return max(1, (2 * responses + self.global_batch) // (2 * self.global_batch))

    @property
    def _kl_on(self) -> bool:
        return bool(self.algorithm["kl"]["coefficient"]) and self.reference is not None

    def _reference_logp(self, batch: TrainBatch) -> Tensor:
        ref = torch.zeros_like(batch.rollout_logp)
        with torch.no_grad():
            for index in self._micro_batches(torch.arange(batch.size), batch):
                mb = batch.select(index)
                logp, _ = sequence_logprobs(self.reference, mb.input_ids, mb.attention_mask)  # type: ignore[arg-type]
                ref[index, : mb.input_ids.shape[1]] = logp
        return ref

    def _share(self, m: Tensor) -> float:
        """What a (micro-)batch with loss mask ``m`` counts in its loss's mean: tokens for a
        token-mean loss, non-empty responses for a sequence-mean one."""
        if self.loss_name in TOKEN_MEAN_LOSSES:
            return float(m.sum())
        return float((m.sum(1) > 0).sum())

    def _lr(self) -> float:
        opt = self.opt_cfg
        lr = learning_rate(self.optimizer_steps, total=self.total_optimizer_steps, lr=opt["lr"],
                           min_lr=opt["min_lr"], warmup=opt["warmup_steps"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _micro_loss(self, logp: Tensor, index: Tensor, mb: TrainBatch, step: StepTensors,
                    total_tokens: float, denom: float, sums: dict[str, float],
                    counts: dict[str, float]) -> Tensor:
        """The micro-batch's loss *sum*: loss · share (+ β · Σ kl · denom / tokens), so that
        Σ over the mini-batch's micro-batches / denom is the mini-batch loss (module doc).
        Adds the micro-batch's metrics to ``sums`` / ``counts``."""
        length = mb.input_ids.shape[1]
        m = step.mask[index, :length]
        share = self._share(m)
        out = compute_loss(
            self.loss_name, self.loss_params, logp=logp, old_logp=step.old_logp[index, :length],
            advantages=mb.advantages, mask=m, entropy=step.entropy[index, :length],
            vocab_size=self.vocab_size, token_weight=step.token_weight[index, :length])
        loss = out.loss * share if share else logp.sum() * 0.0  # no NaN from an empty mean
        if step.ref_logp is not None:
            kl_cfg = self.algorithm["kl"]
            kl = kl_penalty(logp, step.ref_logp[index, :length], kl_cfg["estimator"])
            kl_sum = (kl * m).sum()
            loss = loss + kl_cfg["coefficient"] * kl_sum * (denom / max(total_tokens, 1.0))
            sums["kl"] = sums.get("kl", 0.0) + float(kl_sum.detach())
            counts["kl"] = counts.get("kl", 0.0) + float(m.sum())
        if share:
            for key, value in out.metrics.items():
                aggregate.add(sums, counts, key, value, share)
        return loss

    def _optimizer_step(self, step: StepTensors, mini: Tensor, sums: dict[str, float],
                        counts: dict[str, float]) -> None:
        batch = step.batch
        total_tokens = float(step.mask[mini].sum())
        denom = max(self._share(step.mask[mini]), 1.0)
        lr = self._lr()
        self.optimizer.zero_grad(set_to_none=True)
        # RL-ZVP's rows first, then the others: ‖g_R‖ is read between the two (module doc)
        parts = [(mini, False)]
        if step.reshaped is not None:
            r = step.reshaped[mini]
            parts = [(mini[r], True), (mini[~r], False)]
        norm_reshaped = 0.0
        for rows, reshaped in parts:
            if not len(rows):
                continue
            for index in self._micro_batches(rows, batch):
                mb = batch.select(index)
                with self._routing(mb.routing):
                    logp, _ = self._logprobs(mb.input_ids, mb.attention_mask)
                loss = self._micro_loss(logp, index, mb, step, total_tokens, denom, sums, counts)
                (loss / denom).backward()
            if reshaped:
                norm_reshaped = float(nn.utils.get_total_norm(
                    [p.grad for p in self.model.parameters() if p.grad is not None]))
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.opt_cfg["clip_grad"])
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
        counts["grad_norm"] = counts.get("grad_norm", 0.0) + 1
        if step.reshaped is not None:
            share = norm_reshaped / float(grad_norm) if float(grad_norm) > 0 else 0.0
            sums["reshaped_grad_norm_share"] = sums.get("reshaped_grad_norm_share", 0.0) + share
            counts["reshaped_grad_norm_share"] = counts.get("reshaped_grad_norm_share", 0.0) + 1
        sums["lr"], counts["lr"] = lr, 1.0
        self.optimizer.step()
        self.optimizer_steps += 1


def schedule_length(spec: dict[str, Any], derived: dict[str, Any]) -> int:
    """Optimizer steps the learning-rate schedule spans: the plan's optimizer steps per RL
    step (rollouts / global batch × ppo_epochs: the epochs are already in it) × train.steps."""
    per_step = int(derived.get("optimizer_steps_per_rollout") or 1)
    return per_step * int(spec["train"]["steps"])

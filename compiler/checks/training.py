"""Checks of the trainer's layout: training and expert grids, attention / TP, the Qwen3
head_dim, pipeline, sequence and context parallelism, batch arithmetic, interleaved schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator

from compiler.checks._common import (
    ARCH,
    CP,
    EP,
    ETP,
    FIRST,
    GBS,
    GPN,
    HEAD_DIM,
    LAST,
    MAX_TOKENS,
    MBS,
    MOE,
    PP,
    PROMPT_TOKENS,
    SP,
    TP,
    TRAIN_NODES,
    VPP,
    _divisors,
    _error,
    _list,
    _multiples_near,
    _nearest,
    _or,
    _warning,
)
from compiler.plan import Plan
from spec.errors import Problem
from spec.models import Spec


def _etp(spec: Spec, plan: Plan) -> str:
    """How ETP is shown in messages: its value, and where it came from when defaulted."""
    tp = spec.train.parallelism.tensor
    if plan.expert_tensor_defaulted:
        return f"{plan.expert_tensor_parallel} (expert_tensor unset, so ETP = TP = {tp})"
    return str(plan.expert_tensor_parallel)


def _world(spec: Spec, plan: Plan) -> str:
    if spec.train.backend == "local":
        return "world size 1 (the embedded trainer is one process)"
    return (f"world size {plan.train_world_size} ({spec.train.nodes} node(s) × "
            f"{spec.cluster.gpus_per_node} GPUs)")


def _nodes_fixing(spec: Spec, plan: Plan) -> list[int]:
    """train.nodes values whose world size fits both the training and the expert grid."""
    p = spec.train.parallelism
    grid = p.tensor * p.pipeline * p.context
    if spec.model.architecture.moe is not None:
        grid = math.lcm(grid, plan.expert_tensor_parallel * p.expert * p.pipeline)
    gpn = spec.cluster.gpus_per_node
    return _nearest(spec.train.nodes, lambda n: (n * gpn) % grid == 0)


# --------------------------------------------------------------------------- training grid


def training_grid(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """W % (TP·PP·CP) == 0, W = train.nodes × gpus_per_node; DP = W / (TP·PP·CP)."""
    p = spec.train.parallelism
    grid = p.tensor * p.pipeline * p.context
    if plan.train_world_size % grid:
        nodes = _nodes_fixing(spec, plan)
        hint = f"set train.nodes: {_or(nodes)}" if nodes else "change the parallel sizes"
        yield _error(
            ("train", "parallelism"),
            f"the trainer's {_world(spec, plan)} is not a multiple of TP·PP·CP = "
            f"{p.tensor}·{p.pipeline}·{p.context} = {grid}",
            f"{hint}, or choose TP·PP·CP dividing {plan.train_world_size}",
            (TRAIN_NODES, GPN, TP, PP, CP),
        )


# --------------------------------------------------------------------------- expert grid


def expert_grid(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """W % (ETP·EP·PP) == 0 (CP is not part of it); an unset ETP means ETP = TP.

    Most real launch failures hit this rule: with TP > 1 and expert_tensor unset, Megatron's
    default ETP = TP silently multiplies the expert grid by TP. That default is reported as a
    warning when the grid fits (when it does not, the error says so), so `inspect` shows it.
    """
    moe = spec.model.architecture.moe
    if moe is None:
        return
    p = spec.train.parallelism
    etp = plan.expert_tensor_parallel
    grid = etp * p.expert * p.pipeline
    w = plan.train_world_size
    if w % grid:
        if plan.expert_tensor_defaulted and p.tensor > 1 and w % (p.expert * p.pipeline) == 0:
            hint = "set train.parallelism.expert_tensor: 1"
        else:
            eps = _nearest(p.expert, lambda e: moe.num_experts % e == 0 and w % (etp * e * p.pipeline) == 0,
                           limit=moe.num_experts)
            nodes = _nodes_fixing(spec, plan)
            options = []
            if eps:
                options.append(f"set train.parallelism.expert: {_or(eps)}")
            if nodes:
                options.append(f"set train.nodes: {_or(nodes)}")
            hint = ", or ".join(options) or "change the expert grid"
        yield _error(
            EP,
            f"the trainer's {_world(spec, plan)} is not a multiple of the expert grid "
            f"ETP·EP·PP = {etp}·{p.expert}·{p.pipeline} = {grid}; ETP = {_etp(spec, plan)}",
            hint,
            (ETP, PP, TRAIN_NODES, GPN),
        )
    elif plan.expert_tensor_defaulted and p.tensor > 1:  # fits, but not as EP·PP suggests
        yield _warning(
            ETP,
            f"expert_tensor is unset, so Megatron uses ETP = TP = {p.tensor}: the expert grid is "
            f"ETP·EP·PP = {p.tensor}·{p.expert}·{p.pipeline} = {grid} GPUs "
            f"(expert-DP {plan.expert_data_parallel}), not EP·PP = {p.expert * p.pipeline}",
            "set train.parallelism.expert_tensor: 1 (usual for fine-grained experts), or write "
            f"expert_tensor: {p.tensor} to keep Megatron's default explicitly",
            (TP, EP),
        )


def expert_sizes(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """num_experts % EP == 0; EP > 1 or an explicit ETP > 1 only for MoE models;
    expert FFN width % ETP == 0 (Megatron splits each expert's FFN over ETP ranks)."""
    moe = spec.model.architecture.moe
    p = spec.train.parallelism
    if moe is None:
        if p.expert > 1:
            yield _error(EP, f"expert parallel size {p.expert} on a dense model (no model.architecture.moe)",
                         "set train.parallelism.expert: 1", (MOE,))
        if p.expert_tensor is not None and p.expert_tensor > 1:
            yield _error(ETP, f"expert tensor parallel size {p.expert_tensor} on a dense model",
                         "remove train.parallelism.expert_tensor", (MOE,))
        return
    if moe.num_experts % p.expert:
        eps = _nearest(p.expert, lambda e: moe.num_experts % e == 0, limit=moe.num_experts)
        yield _error(
            EP,
            f"num_experts {moe.num_experts} is not a multiple of expert parallel size {p.expert}",
            f"set train.parallelism.expert: {_or(eps)} (divisors of {moe.num_experts}: "
            f"{_list(_divisors(moe.num_experts))})",
            ((*MOE, "num_experts"),),
        )
    etp = plan.expert_tensor_parallel
    if moe.expert_ffn_hidden_size % etp:
        yield _error(
            ETP,
            f"expert_ffn_hidden_size {moe.expert_ffn_hidden_size} is not a multiple of ETP = "
            f"{_etp(spec, plan)}",
            "set train.parallelism.expert_tensor: 1",
            ((*MOE, "expert_ffn_hidden_size"),),
        )


# --------------------------------------------------------------------------- attention / TP


def attention_tp(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """num_attention_heads % TP == 0 and num_query_groups % TP == 0 (GQA; MLA has no groups);
    dense / shared-expert FFN widths % TP == 0 (column-parallel split)."""
    arch = spec.model.architecture
    tp = spec.train.parallelism.tensor
    groups = arch.num_query_groups or arch.num_attention_heads
    if arch.attention == "mla":
        valid = _divisors(arch.num_attention_heads)
    else:
        valid = _divisors(math.gcd(arch.num_attention_heads, groups))
    hint = f"set train.parallelism.tensor to one of {_list(valid)}"
    if arch.num_attention_heads % tp:
        yield _error(TP, f"num_attention_heads {arch.num_attention_heads} is not a multiple of "
                         f"tensor parallel size {tp}", hint, ((*ARCH, "num_attention_heads"),))
    if arch.attention == "gqa" and groups % tp:
        yield _error(TP, f"num_query_groups {groups} is not a multiple of tensor parallel size "
                         f"{tp} (Megatron shards KV heads, it does not replicate them)",
                     hint, ((*ARCH, "num_query_groups"),))
    moe = arch.moe
    has_dense = moe is None or moe.first_dense_layers > 0
    if has_dense and arch.ffn_hidden_size % tp:
        yield _error(TP, f"ffn_hidden_size {arch.ffn_hidden_size} is not a multiple of tensor "
                         f"parallel size {tp}", hint, ((*ARCH, "ffn_hidden_size"),))
    if moe is not None and moe.shared_experts:
        shared = moe.shared_expert_ffn_hidden_size or moe.shared_experts * moe.expert_ffn_hidden_size
        if shared % tp:
            yield _error(TP, f"shared-expert FFN width {shared} is not a multiple of tensor "
                             f"parallel size {tp}", hint,
                         ((*MOE, "shared_expert_ffn_hidden_size"),))


# Qwen3 and Qwen3-MoE set head_dim on their own, not as hidden_size / heads: every published
# checkpoint has 128 (Qwen3-30B-A3B: 2048 / 32 = 64), and so does HF's Qwen3Config by default.
QWEN3_HEAD_DIM = 128


def checkpoint_head_dim(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """A Qwen3 checkpoint with head_dim left out: the default hidden_size / heads is not what
    Qwen3 uses (128), so parameter counts, memory and the conversion would silently be wrong
    (Qwen3-30B-A3B: 30.08 B / 2.90 B instead of 30.53 B / 3.35 B). Required when it differs.
    Where the checkpoint's config.json is readable, `compiler.api` compares it instead."""
    arch = spec.model.architecture
    if (spec.model.checkpoint is None or arch.family not in ("qwen3", "qwen3_moe")
            or arch.attention != "gqa" or arch.head_dim is not None):
        return
    derived = arch.hidden_size // arch.num_attention_heads
    if derived != QWEN3_HEAD_DIM:
        yield _error(
            HEAD_DIM,
            f"head_dim is not given, so it would be hidden_size / num_attention_heads = "
            f"{arch.hidden_size} / {arch.num_attention_heads} = {derived}; {arch.family} sets "
            f"head_dim on its own ({QWEN3_HEAD_DIM} in every published Qwen3 checkpoint), so the "
            f"parameter count, the memory estimate and the conversion of {spec.model.checkpoint} "
            "would be wrong",
            f"set model.architecture.head_dim to the head_dim of the checkpoint's config.json "
            f"(usually {QWEN3_HEAD_DIM})",
            ((*ARCH, "hidden_size"), (*ARCH, "num_attention_heads"), ("model", "checkpoint")),
        )


# --------------------------------------------------------------------------- pipeline


def _uneven_hint(layers: int, pp: int) -> str | None:
    """A last-stage size that makes `layers` split over `pp` stages: k on PP − 1 stages."""
    for k in range(math.ceil(layers / pp), 0, -1):
        last = layers - (pp - 1) * k
        if last >= 1:
            return (f"set train.parallelism.last_pipeline_stage_layers: {last} "
                    f"({k} layers on each of the other {pp - 1} stages)")
    return None


def pipeline(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """num_layers % PP == 0, unless uneven first/last stages are given: then the remaining
    layers split evenly (and non-empty) over the middle stages. Uneven stages need PP > 1.
    With virtual pipeline: PP > 1 and every stage's layers % VPP == 0."""
    p = spec.train.parallelism
    n_layers = spec.model.architecture.num_layers
    first, last, pp = p.first_pipeline_stage_layers, p.last_pipeline_stage_layers, p.pipeline
    layers_path = (*ARCH, "num_layers")
    if first is not None or last is not None:
        where = FIRST if first is not None else LAST
        if pp == 1:
            yield _error(where, "first/last pipeline stage layers are given but pipeline is 1",
                         "remove them, or set train.parallelism.pipeline > 1", (PP,))
            return
        given = (first is not None) + (last is not None)
        middle = pp - given
        rest = n_layers - (first or 0) - (last or 0)
        ends = " + ".join(f"{name} {v}" for name, v in (("first", first), ("last", last))
                          if v is not None)
        if middle == 0 and rest != 0:
            half = n_layers // 2
            yield _error(where, f"{ends} = {n_layers - rest} layers on {pp} stages, but the "
                                f"model has {n_layers}",
                         f"make first + last = {n_layers}, e.g. first_pipeline_stage_layers: "
                         f"{n_layers - half} and last_pipeline_stage_layers: {half}",
                         (layers_path, PP))
            return
        if middle > 0 and (rest <= 0 or rest % middle):
            yield _error(
                where,
                f"{n_layers} layers − {ends} leaves {rest} for the {middle} middle stage(s) of "
                f"PP {pp}: not a positive multiple of {middle}",
                _uneven_hint(n_layers, pp) if last is not None and first is None else
                "choose first/last so that the rest divides evenly over the middle stages",
                (layers_path, PP),
            )
            return
    elif n_layers % pp:
        divisors = [d for d in _divisors(n_layers) if d > 1]
        hint = _uneven_hint(n_layers, pp)
        alt = f"set train.parallelism.pipeline: one of {_list(divisors)}" if divisors else None
        yield _error(PP, f"num_layers {n_layers} is not a multiple of pipeline parallel size {pp}",
                     ", or ".join(h for h in (hint, alt) if h), (layers_path,))
        return
    vpp = p.virtual_pipeline
    if vpp is not None:
        if pp == 1:
            yield _error(VPP, f"virtual_pipeline {vpp} needs pipeline parallel size > 1",
                         "remove train.parallelism.virtual_pipeline", (PP,))
        else:
            bad = [(i, n) for i, n in enumerate(plan.pipeline_layers) if n % vpp]
            if bad:
                stages = ", ".join(f"stage {i}: {n}" for i, n in bad[:4])
                ok = [v for v in _divisors(math.gcd(*plan.pipeline_layers)) if v > 1] or [1]
                yield _error(VPP, f"pipeline stages have layers not divisible by virtual_pipeline "
                                  f"{vpp} ({stages})",
                             f"set train.parallelism.virtual_pipeline: one of {_list(ok)}",
                             (PP, layers_path))


# --------------------------------------------------------------------------- sequence parallel


def _length_multiple(spec: Spec) -> int:
    """What the sequence length must be a multiple of for CP and SP together: 2·CP for
    load-balanced CP; CP·TP for SP (each CP rank's S/CP positions are split over TP); so
    lcm(2·CP, CP·TP) = CP·lcm(2, TP) with both."""
    p = spec.train.parallelism
    cp = 2 * p.context if p.context > 1 else 1
    sp = p.context * p.tensor if p.sequence_parallel and p.tensor > 1 else 1
    return math.lcm(cp, sp)


def _max_tokens_fixing(spec: Spec, plan: Plan) -> int:
    """The smallest rollout.max_tokens ≥ the current one whose sequence length suits CP and SP."""
    return spec.rollout.max_tokens + (-plan.seq_len) % _length_multiple(spec)


def sequence_parallel(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """MoE + TP > 1 needs sequence_parallel (Megatron-LM: "When using MoE and tensor
    parallelism, sequence parallelism must be used"); SP with TP = 1 is only a warning.
    SP with TP > 1: sequence length (prompt + response) % (CP·TP) == 0, else each full-length
    sequence is padded to the next multiple (a warning; verl issue 3296: 514 + 512 tokens at
    TP 8)."""
    p = spec.train.parallelism
    if spec.model.architecture.moe is not None and p.tensor > 1 and not p.sequence_parallel:
        yield _error(SP, f"an MoE model with tensor parallel size {p.tensor} needs sequence "
                         "parallelism (megatron-core raises at the first training step)",
                     "set train.parallelism.sequence_parallel: true", (TP, MOE))
    if p.sequence_parallel and p.tensor == 1:
        yield _warning(SP, "sequence_parallel with tensor parallel size 1 does nothing "
                           "(Megatron switches it off)",
                       "remove sequence_parallel, or set train.parallelism.tensor > 1", (TP,))
    shard = p.context * p.tensor
    if p.sequence_parallel and p.tensor > 1 and plan.seq_len % shard:
        padded = -(-plan.seq_len // shard) * shard
        size = f"TP = {p.tensor}" if p.context == 1 else \
            f"CP·TP = {p.context}·{p.tensor} = {shard} (SP splits each CP rank's share over TP)"
        yield _warning(
            SP,
            f"sequence length {plan.seq_len} (max_prompt_tokens {spec.data.max_prompt_tokens} + "
            f"max_tokens {spec.rollout.max_tokens}) is not a multiple of {size}: sequence "
            f"parallelism splits the positions over the TP ranks, so full-length sequences are "
            f"padded to {padded} tokens ({padded - plan.seq_len} of padding)",
            f"set rollout.max_tokens: {_max_tokens_fixing(spec, plan)}",
            (TP, PROMPT_TOKENS, MAX_TOKENS),
        )


# --------------------------------------------------------------------------- context parallel


def context_parallel(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """CP > 1: the max sequence length (prompt + response) % (2·CP) == 0 (load-balanced
    causal CP splits each sequence into 2·CP chunks). The hint also keeps SP's multiple."""
    cp = spec.train.parallelism.context
    if cp > 1 and plan.seq_len % (2 * cp):
        yield _error(
            CP,
            f"sequence length {plan.seq_len} (max_prompt_tokens {spec.data.max_prompt_tokens} + "
            f"max_tokens {spec.rollout.max_tokens}) is not a multiple of 2·CP = {2 * cp}",
            f"set rollout.max_tokens: {_max_tokens_fixing(spec, plan)}",
            (PROMPT_TOKENS, MAX_TOKENS),
        )


# --------------------------------------------------------------------------- batch arithmetic


def batch_arithmetic(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """global_batch % (micro_batch · DP) == 0 (skipped when the grid itself is broken)."""
    dp = plan.data_parallel
    if dp == 0:
        return
    step = spec.train.micro_batch_size * dp
    gbs = spec.train.global_batch_size
    if gbs % step:
        rollouts = plan.rollouts_per_step
        good = _nearest(gbs, lambda g: g % step == 0 and rollouts % g == 0, limit=rollouts)
        good = good or _multiples_near(gbs, step)
        yield _error(
            GBS,
            f"global_batch_size {gbs} is not a multiple of micro_batch_size · DP = "
            f"{spec.train.micro_batch_size}·{dp} = {step}",
            f"set train.global_batch_size: {_or(good)}",
            (MBS, ("train", "parallelism"), TRAIN_NODES),
        )


def interleaved_schedule(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """With virtual pipeline: M ≥ PP, M = global_batch / (micro_batch · DP) micro-batches per
    step on each DP rank. Megatron's interleaved schedule runs the micro-batches in groups of PP
    per model chunk and raises before the first step with fewer (verl issue 1004: PP 2, VPP 2,
    M = 1). Skipped without PP > 1 (the pipeline rule) or when the grid itself is broken."""
    p = spec.train.parallelism
    dp, pp, m = plan.data_parallel, p.pipeline, plan.micro_batches_per_step
    if p.virtual_pipeline is None or pp == 1 or dp == 0 or m >= pp:
        return
    mbs, gbs = spec.train.micro_batch_size, spec.train.global_batch_size
    step = mbs * dp
    need = step * pp  # the smallest global batch giving PP micro-batches
    batches = next((g for g in _divisors(plan.rollouts_per_step) if g >= need and g % step == 0),
                   need)
    options = [f"train.global_batch_size: {batches}"]
    if gbs % dp == 0:  # a smaller micro-batch: (gbs / DP) / micro_batch ≥ PP, whole
        per_rank = gbs // dp
        micro = [d for d in _divisors(per_rank) if d < mbs and per_rank // d >= pp]
        if micro:
            options.insert(0, f"train.micro_batch_size: {micro[-1]} "
                              f"({per_rank // micro[-1]} micro-batches)")
    yield _error(
        VPP,
        f"virtual_pipeline {p.virtual_pipeline} (Megatron's interleaved schedule) needs at least "
        f"PP = {pp} micro-batches per step on each DP rank, but global_batch_size {gbs} / "
        f"(micro_batch_size · DP = {mbs}·{dp}) = {m}",
        "set " + ", or ".join(options) + ", or remove train.parallelism.virtual_pipeline",
        (PP, GBS, MBS),
    )

"""Cross-section checks of a spec against its Plan (DESIGN.md §3), before anything runs.

`check(spec, plan)` returns every problem at once: errors (the run cannot start, or would
silently do something else than written) and warnings (legal but probably not meant; shown
by `validate` and `inspect`). Each rule is a small function of (spec, plan) that names the
fields involved (`path` + `related`), the conflicting numbers, and a value that would fix it.

Rules are grouped by concern, in the order a person would fix them: training grid, expert
grid, attention/TP, Qwen3 head_dim, pipeline, sequence parallel, context parallel, batch
arithmetic, rollout, run-level, ZVE budgets, references between sections, settings the
selected path does not read, memory.

What a job of the bundle would refuse at start (the embedded trainer on GPUs, a layout the
Megatron trainer does not run, router replay on a dense model, …) is declared by the runtime
(`runtime.capabilities`) and checked by `compiler.api` through every job's preflight, not here.

Decisions where DESIGN.md §3 leaves room (see each rule's docstring):
- Memory over capacity is an error only when weights + grads + activations alone are over;
  when only the optimizer state pushes it over, it is a warning, because production recipes
  (slime's Qwen3-235B, GLM-4.5, DeepSeek-R1) offload the optimizer to the CPU.
- An rl_zvp `fallback` of a drop stage counts as "a flat_groups stage whose action is rl_zvp"
  for the advantage-estimator agreement: both need the rl_zvp estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from pydantic import BaseModel

from compiler.plan import Plan, make_plan
from spec.errors import PathPart, Problem, SpecError
from spec.models import AdaptiveGroupSize, FlatGroups, RewardShaping, Spec

Path = tuple[PathPart, ...]
Rule = Callable[[Spec, Plan], Iterable[Problem]]

TP: Path = ("train", "parallelism", "tensor")
PP: Path = ("train", "parallelism", "pipeline")
VPP: Path = ("train", "parallelism", "virtual_pipeline")
CP: Path = ("train", "parallelism", "context")
EP: Path = ("train", "parallelism", "expert")
ETP: Path = ("train", "parallelism", "expert_tensor")
SP: Path = ("train", "parallelism", "sequence_parallel")
FIRST: Path = ("train", "parallelism", "first_pipeline_stage_layers")
LAST: Path = ("train", "parallelism", "last_pipeline_stage_layers")
TRAIN_NODES: Path = ("train", "nodes")
GPN: Path = ("cluster", "gpus_per_node")
GBS: Path = ("train", "global_batch_size")
MBS: Path = ("train", "micro_batch_size")
ARCH: Path = ("model", "architecture")
MOE: Path = (*ARCH, "moe")
R_TP: Path = ("rollout", "parallelism", "tensor")
R_DP: Path = ("rollout", "parallelism", "data")
R_EP: Path = ("rollout", "parallelism", "expert_parallel")
R_NODES: Path = ("rollout", "nodes")
MAX_TOKENS: Path = ("rollout", "max_tokens")
PROMPT_TOKENS: Path = ("data", "max_prompt_tokens")
MAX_POS: Path = (*ARCH, "max_position_embeddings")
HEAD_DIM: Path = (*ARCH, "head_dim")
GPU_MEM: Path = ("cluster", "gpu_memory_gb")

NEAR_MEMORY = 0.9  # within 10 % of capacity: a warning
# FP8 rollouts (fp8_rollout): FP8-rounded weights alone move the engines' mean |log-prob gap|
# to about 1e-3 (examples/tiny after 10 SFT steps, tests/runtime/test_run.py) – 1e-1 (a random
# MoE with peaked logits, tests/runtime/test_fp8.py); a weight-sync tolerance below this
# would stop an FP8 run on its numerics alone.
FP8_SYNC_TOLERANCE = 1e-2


def _error(path: Path, message: str, suggestion: str | None = None,
           related: Iterable[Path] = ()) -> Problem:
    return Problem(path, message, suggestion, "error", related=tuple(related))


def _warning(path: Path, message: str, suggestion: str | None = None,
             related: Iterable[Path] = ()) -> Problem:
    return Problem(path, message, suggestion, "warning", related=tuple(related))


def _nearest(value: int, ok: Callable[[int], bool], limit: int | None = None) -> list[int]:
    """The closest integers ≥ 1 below and above `value` for which `ok` holds (value excluded)."""
    hi = limit if limit is not None else 4 * value + 64
    out = [v for v in (next((v for v in range(value - 1, 0, -1) if ok(v)), None),
                       next((v for v in range(value + 1, hi + 1) if ok(v)), None))
           if v is not None]
    return out


def _or(values: Iterable[int]) -> str:
    return " or ".join(str(v) for v in values)


def _divisors(n: int) -> list[int]:
    """Divisors of n in increasing order, in O(√n) (specs may hold absurd numbers)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _multiples_near(value: int, step: int) -> list[int]:
    """The multiples of `step` nearest to `value` (below, if ≥ 1, and above)."""
    below = (value // step) * step
    return [m for m in (below if below != value else below - step, below + step) if m >= 1]


def _list(values: list[int], most: int = 8) -> str:
    return ", ".join(str(v) for v in values[:most]) + (", …" if len(values) > most else "")


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


# --------------------------------------------------------------------------- rollout


def rollout_grid(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """One engine replica (TP·DP GPUs) must tile the rollout nodes: R % (TP·DP) == 0, and a
    replica either fits inside a node or spans whole nodes. num_attention_heads % TP == 0;
    KV heads % TP == 0, or TP % KV heads == 0 when there are fewer (vLLM replicates them).
    With expert_parallel, EP = TP·DP divides the physical experts, num_experts +
    redundant_experts (EPLB replicas: slime's Qwen3-30B-A3B serves 128 + 16 experts at EP 24)."""
    arch = spec.model.architecture
    rp = spec.rollout.parallelism
    gpr, r, gpn = plan.gpus_per_replica, plan.rollout_world_size, spec.cluster.gpus_per_node
    where = ("rollout", "parallelism")
    if r % gpr or (gpr < gpn and gpn % gpr) or (gpr > gpn and gpr % gpn):
        tps = [t for t in _divisors(gpn) if arch.num_attention_heads % t == 0]
        yield _error(
            where,
            f"an engine replica of TP·DP = {rp.tensor}·{rp.data} = {gpr} GPUs does not tile the "
            f"rollout's {r} GPUs ({spec.rollout.nodes} node(s) × {gpn})",
            f"use TP·DP dividing {gpn} (e.g. tensor {_or(tps[-2:])}) or a multiple of {gpn} "
            f"that divides {r}",
            (R_TP, R_DP, R_NODES, GPN),
        )
    if arch.num_attention_heads % rp.tensor:
        valid = [t for t in _divisors(arch.num_attention_heads) if t <= max(gpn, rp.tensor)]
        yield _error(R_TP, f"num_attention_heads {arch.num_attention_heads} is not a multiple of "
                           f"rollout tensor parallel size {rp.tensor}",
                     f"set rollout.parallelism.tensor to one of {_list(valid)}",
                     ((*ARCH, "num_attention_heads"),))
    if arch.attention == "gqa":
        kv = arch.num_query_groups or arch.num_attention_heads
        if (kv >= rp.tensor and kv % rp.tensor) or (kv < rp.tensor and rp.tensor % kv):
            yield _error(R_TP, f"{kv} KV heads cannot be split over rollout tensor parallel size "
                               f"{rp.tensor} (vLLM needs KV heads % TP == 0, or TP % KV heads == 0 "
                               "to replicate them)",
                         f"set rollout.parallelism.tensor to a divisor or multiple of {kv}",
                         ((*ARCH, "num_query_groups"),))
    if rp.expert_parallel:
        moe = arch.moe
        if moe is None:
            yield _warning(R_EP, "expert_parallel on a dense model does nothing",
                           "set rollout.parallelism.expert_parallel: false", (MOE,))
        elif (moe.num_experts + spec.rollout.redundant_experts) % gpr:
            redundant = spec.rollout.redundant_experts
            physical = moe.num_experts + redundant
            experts = f"num_experts {moe.num_experts}" + (
                f" + redundant_experts {redundant} = {physical}" if redundant else "")
            hint = (f"choose TP·DP among the divisors of {physical}: "
                    f"{_list(_divisors(physical), 10)}")
            if spec.rollout.engine == "vllm":  # vLLM EPLB (the redundant_experts rule)
                fix = redundant + (-physical) % gpr
                hint = f"set rollout.redundant_experts: {fix}, or {hint}"
            yield _error(R_EP, f"vLLM's expert-parallel size TP·DP = {rp.tensor}·{rp.data} = {gpr} "
                               f"does not divide {experts}",
                         hint, (R_TP, R_DP, (*MOE, "num_experts"), ("rollout", "redundant_experts")))


def redundant_experts(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """rollout.redundant_experts > 0 (vLLM EPLB, `--enable-eplb`) needs an MoE model,
    rollout expert_parallel with EP = TP·DP > 1 (vLLM refuses EPLB otherwise), and engine vllm
    (the embedded engine has no EPLB: the key would do nothing). The divisibility
    (num_experts + redundant) % EP == 0 is in rollout_grid."""
    r = spec.rollout
    if r.redundant_experts == 0:
        return
    path: Path = ("rollout", "redundant_experts")
    n = r.redundant_experts
    rp = r.parallelism
    if spec.model.architecture.moe is None:
        yield _error(path, f"redundant_experts {n} on a dense model: there are no experts to "
                           "replicate", "remove rollout.redundant_experts", (MOE,))
        return
    if not rp.expert_parallel:
        yield _error(path, f"redundant_experts {n} replicate experts across expert-parallel ranks "
                           "(vLLM EPLB), but rollout.parallelism.expert_parallel is false",
                     "set rollout.parallelism.expert_parallel: true, or remove "
                     "rollout.redundant_experts", (R_EP,))
    elif plan.gpus_per_replica == 1:
        yield _error(path, f"redundant_experts {n} with an expert-parallel size TP·DP = "
                           f"{rp.tensor}·{rp.data} = 1: vLLM's EPLB needs TP·DP > 1",
                     "raise rollout.parallelism.tensor or data, or remove "
                     "rollout.redundant_experts", (R_TP, R_DP))
    if r.engine != "vllm":
        yield _error(path, f"redundant_experts {n} needs vLLM's EPLB, but rollout.engine is "
                           f"{r.engine} (the embedded engine has no expert load balancing)",
                     "set rollout.engine: vllm, or remove rollout.redundant_experts",
                     (("rollout", "engine"),))


def fp8_rollout(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """FP8 rollouts (``rollout.fp8``: vLLM ``--quantization fp8``, the embedded engine's
    FP8-rounded weights) sample from other numerics than the trainer's BF16/FP32 policy:
    every token's log-prob differs, so the update needs the train–inference correction
    (``algorithm.correction`` tis or mis; none is an error). On an MoE model the rounding
    also flips expert choices near a routing tie, which only router replay r3 removes (the
    trainer then routes as the FP8 engine did): without it a warning. FP8-RL (arXiv
    2601.18150) reports an MoE run with BF16 training and FP8 rollouts that collapsed without
    importance-sampling correction. The gap the step's weight-sync check measures grows with
    FP8 too: a ``system.weight_sync_tolerance`` below ``FP8_SYNC_TOLERANCE`` (1e-2) would
    stop the run at its first step (a warning: the gap depends on the model)."""
    if not spec.rollout.fp8:
        return
    fp8: Path = ("rollout", "fp8")
    correction: Path = ("algorithm", "correction", "mode")
    if spec.algorithm.correction.mode == "none":
        yield _error(correction,
                     "rollout.fp8 samples with FP8-rounded weights while the trainer computes in "
                     f"{spec.train.precision}: every rollout token's log-prob differs from the "
                     "trainer's, and algorithm.correction.mode none leaves the update biased "
                     "(FP8-RL, arXiv 2601.18150: an MoE run with BF16 training and FP8 "
                     "rollouts collapsed without importance-sampling correction)",
                     "set algorithm.correction.mode: tis (or mis), or rollout.fp8: false",
                     (fp8,))
    mode = spec.router_replay.mode
    if spec.model.architecture.moe is not None and mode != "r3":
        why = ("router_replay.mode is off" if mode == "off" else
               "router_replay.mode r2 replays the trainer's own routing, not the FP8 engine's")
        yield _warning(("router_replay", "mode"),
                       f"rollout.fp8 on an MoE model and {why}: FP8-rounded router inputs flip "
                       "expert choices near a tie, so the trainer scores some tokens with other "
                       "experts than sampled them, a mismatch the token correction can only "
                       "down-weight (FP8-RL, arXiv 2601.18150: an MoE run with BF16 training "
                       "and FP8 rollouts collapsed without importance-sampling correction)",
                       "set router_replay.mode: r3", (fp8,))
    tolerance = spec.system.weight_sync_tolerance
    if tolerance < FP8_SYNC_TOLERANCE:
        yield _warning(("system", "weight_sync_tolerance"),
                       f"weight_sync_tolerance {tolerance:g} with rollout.fp8: FP8-rounded "
                       "weights alone move the engines' log-probs by about 1e-3 to 1e-1 per "
                       "token on average, so the weight-sync check would stop the run at its "
                       "first step on FP8 numerics alone",
                       f"set system.weight_sync_tolerance: {FP8_SYNC_TOLERANCE:g} or more "
                       "(above the train_inference_gap your model shows with FP8)",
                       (fp8,))


def stale_rollouts(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Bounded-staleness rollouts (``system.max_staleness`` k > 0: step s may be sampled by
    the weights of step s − k, ``runtime.driver``) come from an older policy than the one
    the trainer updates: the update needs the importance weight π_old / μ of the
    train–inference correction (``algorithm.correction`` tis or mis, the decoupled
    objective of AReaL, arXiv 2505.24298); none is an error, since the ratio of the loss
    would treat the stale tokens as on-policy."""
    k = spec.system.max_staleness
    if k and spec.algorithm.correction.mode == "none":
        yield _error(("algorithm", "correction", "mode"),
                     f"system.max_staleness {k}: rollouts may come from weights up to {k} "
                     "step(s) older than the trainer's, and algorithm.correction.mode none "
                     "trains on them as if on-policy (no importance weight π_old / μ for the "
                     "behaviour policy)",
                     "set algorithm.correction.mode: tis (or mis), or system.max_staleness: 0",
                     (("system", "max_staleness"),))


def colocated_placement(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Colocated engines (``rollout.placement: colocated``, ``runtime.placement``) run on the
    trainer's nodes and GPUs: rollout.nodes must equal train.nodes (the replicas tile the
    same GPUs). While the engines are awake each GPU holds what the trainer keeps between its
    steps (weights, gradients, optimizer state: the trainer does not offload them for
    generation; its activations are freed) next to vLLM's share, gpu_memory_utilization ×
    gpu_memory_gb, which vLLM claims at start (it refuses to start with less free memory):
    their sum over gpu_memory_gb is an error, within 10 % a warning (estimates:
    ``compiler.estimates``; not compared for devices cpu). While the trainer steps the
    engines sleep (level 2: weights and KV cache released), so the trainer's own peak is
    the memory rule's. The refusals of the runtime (staleness, vLLM's CPU build) are
    ``runtime.capabilities.placement``'s."""
    r = spec.rollout
    if r.placement != "colocated":
        return
    placement: Path = ("rollout", "placement")
    if r.nodes != spec.train.nodes:
        yield _error(R_NODES, f"colocated engines run on the trainer's {spec.train.nodes} node(s), "
                              f"but rollout.nodes is {r.nodes}",
                     f"set rollout.nodes: {spec.train.nodes}, or rollout.placement: disaggregated",
                     (placement, TRAIN_NODES))
    if spec.cluster.devices == "cpu":
        return
    cap = spec.cluster.gpu_memory_gb
    parts = plan.train_memory.parts
    train = plan.train_memory.total_gb - parts.get("activations", 0.0) - parts.get("attention", 0.0)
    share = r.gpu_memory_utilization * cap
    util: Path = ("rollout", "gpu_memory_utilization")
    free = NEAR_MEMORY * cap - train  # what the trainer leaves to vLLM, with a 10 % margin
    fits = (math.floor(free / cap * 100) / 100) if free > 0 else 0.0
    if plan.rollout_memory.total_gb <= fits * cap:
        hint = f"set rollout.gpu_memory_utilization: {fits:g} or less"
    else:  # no utilization leaves vLLM its weights and one sequence next to the trainer
        hint = ("shrink the trainer's memory (raise PP or EP, train.nodes, set "
                "train.optimizer.cpu_offload), or set rollout.placement: disaggregated")
    total = train + share
    detail = (f"the trainer's weights, gradients and optimizer state ({train:.1f} GB) + vLLM's "
              f"share (gpu_memory_utilization {r.gpu_memory_utilization:g} × {cap:g} GB = "
              f"{share:.1f} GB) = {total:.1f} GB")
    if total > cap:
        yield _error(util, f"colocated on one GPU, {detail} > {cap:g} GB: vLLM would not find "
                           "its share free at start", hint,
                     (placement, GPU_MEM, ("train", "parallelism")))
    elif total >= NEAR_MEMORY * cap:
        yield _warning(util, f"colocated on one GPU, {detail} is within 10 % of {cap:g} GB",
                       hint, (placement, GPU_MEM))


# --------------------------------------------------------------------------- run-level


def run_level(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """prompts_per_step × n is a whole multiple of global_batch_size (optimizer steps per
    rollout batch are derived); prompt + response (rollout and eval) fit the positions."""
    rollouts, gbs = plan.rollouts_per_step, spec.train.global_batch_size
    r = spec.rollout
    if rollouts % gbs:
        # q·n is a multiple of gbs exactly when q is a multiple of gbs / gcd(n, gbs).
        prompts = _multiples_near(r.prompts_per_step, gbs // math.gcd(r.n, gbs))
        yield _error(
            ("rollout", "prompts_per_step"),
            f"prompts_per_step × n = {r.prompts_per_step} × {r.n} = {rollouts} rollouts is not a "
            f"whole multiple of global_batch_size {gbs}",
            f"set rollout.prompts_per_step: {_or(prompts)}, or a global_batch_size dividing "
            f"{rollouts}",
            (("rollout", "n"), GBS),
        )
    max_pos = spec.model.architecture.max_position_embeddings
    prompt = spec.data.max_prompt_tokens
    if plan.seq_len > max_pos:
        yield _error(MAX_TOKENS,
                     f"max_prompt_tokens {prompt} + max_tokens {r.max_tokens} = {plan.seq_len} "
                     f"exceeds max_position_embeddings {max_pos}",
                     f"set rollout.max_tokens: {max(1, max_pos - prompt)} or less",
                     (PROMPT_TOKENS, MAX_POS))
    ev = spec.eval
    if ev.enabled and ev.max_tokens is not None and prompt + ev.max_tokens > max_pos:
        yield _error(("eval", "max_tokens"),
                     f"max_prompt_tokens {prompt} + eval max_tokens {ev.max_tokens} = "
                     f"{prompt + ev.max_tokens} exceeds max_position_embeddings {max_pos}",
                     f"set eval.max_tokens: {max(1, max_pos - prompt)} or less",
                     (PROMPT_TOKENS, MAX_POS))


def cluster_settings(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Slurm without a partition relies on the site default (warning); Slurm's resource
    requests set on a local spec do nothing there (warning); weight_sync ipc needs
    trainer and engines on one machine, which separate Slurm nodes are not (error; colocated
    engines share the trainer's nodes)."""
    c = spec.cluster
    if c.scheduler == "slurm" and not c.partition:
        yield _warning(("cluster", "partition"), "scheduler slurm without a partition: jobs go "
                                                 "to the cluster's default partition",
                       "set cluster.partition", (("cluster", "scheduler"),))
    if c.scheduler == "local":
        # Slurm requests a local run cannot honour: said, not silently ignored.
        for name, flag in (("cpus_per_task", "--cpus-per-task"), ("exclusive", "--exclusive"),
                           ("mem_gb", "--mem")):
            if name in c.model_fields_set:
                yield _warning(("cluster", name), f"cluster.{name} is a Slurm request ({flag}); "
                                                  "a local run neither reserves nor limits it",
                               "remove it, or set cluster.scheduler: slurm",
                               (("cluster", "scheduler"),))
    if (c.scheduler == "slurm" and spec.system.weight_sync == "ipc"
            and spec.rollout.placement != "colocated"):
        yield _error(("system", "weight_sync"),
                     f"weight_sync ipc shares CUDA memory inside one machine, but the trainer "
                     f"({spec.train.nodes} node(s)) and the rollout engines ({spec.rollout.nodes} "
                     "node(s)) run on separate Slurm nodes",
                     "set system.weight_sync: nccl", (TRAIN_NODES, R_NODES))


# --------------------------------------------------------------------------- ZVE budgets


def zve_budgets(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """A stage whose worst case cannot fill a batch needs a declared fallback (flat_groups
    drop: every group may be flat, however many refills); settings a stage ignores, a
    reward_shaping stage that does nothing, and an adaptive stage that cannot grow are warnings."""
    base = plan.rollouts_per_step
    for i, st in enumerate(spec.filters):
        path: Path = ("filters", i)
        if isinstance(st, FlatGroups):
            budget = next((b for b in plan.stage_budgets if b.index == i), None)
            if st.action == "drop" and st.fallback is None:
                worst = budget.worst_case_rollouts_per_step if budget else 0.0
                yield _error(
                    (*path, "fallback"),
                    f"flat_groups drop samples at most {1 + st.max_refills} round(s) of "
                    f"oversample {st.oversample:g} × {spec.rollout.prompts_per_step} prompts "
                    f"({base + worst:g} rollouts per step, {worst:g} beyond the {base}), and the "
                    "batch still comes up short when every group is flat",
                    f"set filters[{i}].fallback: keep, rl_zvp, shrink or error",
                    ((*path, "oversample"), (*path, "max_refills")),
                )
            if st.action != "drop":
                ignored = sorted({"oversample", "max_refills", "fallback"} & st.model_fields_set)
                if ignored:
                    yield _warning((*path, ignored[0]),
                                   f"{', '.join(ignored)} only apply to action drop; this stage's "
                                   f"action is {st.action}",
                                   f"remove {', '.join(ignored)} from filters[{i}]",
                                   ((*path, "action"),))
        elif isinstance(st, RewardShaping):
            if st.length.coefficient == 0 and st.repetition.coefficient == 0:
                yield _warning(path, "reward_shaping with length and repetition coefficients 0 "
                                     "changes no reward",
                               f"set filters[{i}].length.coefficient (e.g. 0.05) or remove the stage",
                               ((*path, "length", "coefficient"),
                                (*path, "repetition", "coefficient")))
        elif isinstance(st, AdaptiveGroupSize) and st.max_n <= spec.rollout.n:
            yield _warning((*path, "max_n"), f"adaptive_group_size max_n {st.max_n} is not above "
                                             f"rollout.n {spec.rollout.n}: no group can grow",
                           f"set filters[{i}].max_n above {spec.rollout.n}", (("rollout", "n"),))


# --------------------------------------------------------------------------- references


def _rl_zvp_stage(spec: Spec) -> int | None:
    """Index of a flat_groups stage that reshapes flat groups with RL-ZVP (action or fallback)."""
    for i, st in enumerate(spec.filters):
        if isinstance(st, FlatGroups) and (st.action == "rl_zvp" or st.fallback == "rl_zvp"):
            return i
    return None


# The judge fields each `reward.judge.type` reads; the other type's are warned about.
JUDGE_FIELDS = {"rule": ("tie_margin",), "http": ("url", "model", "api_key_env", "timeout_s")}


def references(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Fields of one section that name or presuppose another's. Parameters of a loss or a
    judge type that is not selected are warnings (they would be ignored)."""
    est = ("algorithm", "advantage", "estimator")
    zvp = _rl_zvp_stage(spec)
    flat = next((i for i, s in enumerate(spec.filters) if isinstance(s, FlatGroups)), None)
    if spec.algorithm.advantage.estimator == "rl_zvp" and zvp is None:
        where = f"filters[{flat}].action: rl_zvp" if flat is not None else \
            "a filters stage {type: flat_groups, action: rl_zvp}"
        yield _error(est, "advantage estimator rl_zvp, but no flat_groups stage reshapes flat "
                          "groups with rl_zvp",
                     f"add {where}, or set algorithm.advantage.estimator: group",
                     (("filters", flat) if flat is not None else ("filters",),))
    if zvp is not None and spec.algorithm.advantage.estimator != "rl_zvp":
        st = spec.filters[zvp]
        field = "action" if isinstance(st, FlatGroups) and st.action == "rl_zvp" else "fallback"
        yield _error(est, f"filters[{zvp}].{field} is rl_zvp, but the advantage estimator is "
                          f"{spec.algorithm.advantage.estimator}",
                     "set algorithm.advantage.estimator: rl_zvp", (("filters", zvp, field),))

    judge = spec.reward.judge
    if judge is not None and judge.type == "http" and judge.api_key_env and \
            judge.api_key_env not in spec.cluster.env_passthrough:
        yield _error(("reward", "judge", "api_key_env"),
                     f"the judge reads its key from {judge.api_key_env}, which is not in "
                     f"cluster.env_passthrough ({', '.join(spec.cluster.env_passthrough) or 'empty'}): "
                     "the jobs would not see it",
                     f"add {judge.api_key_env} to cluster.env_passthrough",
                     (("cluster", "env_passthrough"),))

    if judge is not None:  # a field only the other judge type reads (runtime.rewards.composer)
        other = "http" if judge.type == "rule" else "rule"
        kind = {"rule": "a rule judge", "http": "an http judge"}
        for name in [f for f in JUDGE_FIELDS[other] if f in judge.model_fields_set]:
            yield _warning(("reward", "judge", name),
                           f"reward.judge.{name} is set but the judge type is {judge.type}: it has "
                           f"no effect for {kind[judge.type]} (only {kind[other]} reads it)",
                           f"remove reward.judge.{name}, or set reward.judge.type: {other}",
                           (("reward", "judge", "type"),))

    chosen = spec.algorithm.loss
    for name in sorted({"espo", "gspo", "grpo", "cispo"} & spec.algorithm.model_fields_set - {chosen}):
        yield _warning(("algorithm", name), f"algorithm.{name} is set but the loss is {chosen}: "
                                            "its parameters are not used",
                       f"remove algorithm.{name}, or set algorithm.loss: {name}",
                       (("algorithm", "loss"),))

    if spec.model.checkpoint_format == "megatron" and spec.train.backend == "local":
        yield _error(("model", "checkpoint_format"), "a megatron checkpoint cannot be read by the "
                                                     "local trainer (it reads HF checkpoints)",
                     "set train.backend: megatron, or give an HF checkpoint",
                     (("train", "backend"),))
    if spec.model.checkpoint_format == "megatron" and spec.model.checkpoint and \
            not spec.model.tokenizer:
        yield _error(("model", "tokenizer"), "a Megatron checkpoint carries no tokenizer, and "
                                             "the rollout engines' HF copy (job to_hf) needs one",
                     "set model.tokenizer to the tokenizer's folder",
                     (("model", "checkpoint_format"),))

    d = spec.data
    if d.generator is None and d.eval is None and (spec.eval.enabled or spec.eval.every_steps):
        # An eval job (or the in-run eval) with no prompts cannot start: an error, not a warning.
        what = "eval is enabled" if spec.eval.enabled else \
            f"eval.every_steps is {spec.eval.every_steps}"
        yield _error(("eval", "enabled") if spec.eval.enabled else ("eval", "every_steps"),
                     f"{what} but data.eval is not set: there are no held-out prompts",
                     "set data.eval to a JSONL file of held-out prompts, or eval.enabled: false "
                     "and eval.every_steps: 0",
                     (("data", "eval"), ("data", "train")))


# --------------------------------------------------------------------------- unused settings


def _changed(section: BaseModel, names: Iterable[str]) -> list[tuple[str, object]]:
    """(name, value) of the fields of ``section`` whose value differs from the model default."""
    fields = type(section).model_fields
    return [(n, getattr(section, n)) for n in names if getattr(section, n) != fields[n].default]


def _show(value: object) -> str:
    """A value as YAML writes it (true / false / null)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


_LOCAL_TRAINER_WHY = "the embedded trainer is one process: it has no model parallelism"
_LOCAL_ENGINE_WHY = "the embedded engine is one torch process per replica: it serves " \
                    "unsharded, without vLLM's memory pool or sequence limit"


def unused_settings(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Settings the selected path does not read, when they differ from their default (a
    harmless no-op, but not what was meant; each warning names the path that would read it):

    - train.backend local: the Megatron layout (``train.parallelism.*``),
      ``optimizer.distributed`` and ``moe.token_dispatcher`` (the embedded trainer is one
      process);
    - rollout.engine local: ``gpu_memory_utilization``, ``max_num_seqs`` and
      ``parallelism.expert_parallel`` (vLLM's); ``parallelism.tensor`` / ``data`` only set how
      many devices each embedded replica claims, so they divide the replica count;
    - train.optimizer.cpu_offload false: ``offload_fraction`` (the share offloaded);
    - cluster.scheduler local: ``partition``, ``account``, ``qos`` (Slurm's; its resource
      requests ``cpus_per_task``, ``exclusive`` and ``mem_gb`` are ``cluster_settings``');
    - cluster.devices cpu: ``gpu_memory_gb`` (memory is compared for GPU runs only)."""
    backend: Path = ("train", "backend")
    if spec.train.backend == "local":
        fields = ("tensor", "pipeline", "virtual_pipeline", "context", "expert", "expert_tensor",
                  "sequence_parallel", "first_pipeline_stage_layers", "last_pipeline_stage_layers")
        for name, value in _changed(spec.train.parallelism, fields):
            yield _warning(("train", "parallelism", name),
                           f"train.parallelism.{name} is {_show(value)} but has no effect with "
                           f"train.backend: local; {_LOCAL_TRAINER_WHY}",
                           f"remove train.parallelism.{name}, or set train.backend: megatron",
                           (backend,))
        for name, value in _changed(spec.train.optimizer, ("distributed",)):
            yield _warning(("train", "optimizer", name),
                           f"train.optimizer.{name} is {_show(value)} but has no effect with "
                           "train.backend: local; the embedded trainer is one process and keeps "
                           "the whole optimizer state", f"remove train.optimizer.{name}",
                           (backend,))
        moe = spec.model.architecture.moe
        for name, value in _changed(moe, ("token_dispatcher",)) if moe is not None else ():
            yield _warning((*MOE, name), f"moe.{name} is {value} but has no effect with "
                                         f"train.backend: local; {_LOCAL_TRAINER_WHY} (every "
                                         "expert runs on its one rank)",
                           f"remove model.architecture.moe.{name}", (backend,))
    if not spec.train.optimizer.cpu_offload:
        for name, value in _changed(spec.train.optimizer, ("offload_fraction",)):
            yield _warning(("train", "optimizer", name),
                           f"train.optimizer.{name} is {_show(value)} but has no effect without "
                           "train.optimizer.cpu_offload: true (nothing is offloaded)",
                           f"remove train.optimizer.{name}, or set cpu_offload: true",
                           (("train", "optimizer", "cpu_offload"),))
    engine: Path = ("rollout", "engine")
    if spec.rollout.engine == "local":
        for name, value in _changed(spec.rollout, ("gpu_memory_utilization", "max_num_seqs")):
            yield _warning(("rollout", name),
                           f"rollout.{name} is {_show(value)} but has no effect with "
                           f"rollout.engine: local; {_LOCAL_ENGINE_WHY}",
                           f"remove rollout.{name}, or set rollout.engine: vllm", (engine,))
        rp = spec.rollout.parallelism
        for name, value in _changed(rp, ("tensor", "data", "expert_parallel")):
            effect = (f"; it only makes each replica claim {plan.gpus_per_replica} device(s), so "
                      f"the rollout nodes run {plan.rollout_replicas} replica(s) instead of "
                      f"{plan.rollout_world_size}" if name != "expert_parallel" else "")
            yield _warning(("rollout", "parallelism", name),
                           f"rollout.parallelism.{name} is {_show(value)} but the embedded engine "
                           f"does not shard its model (rollout.engine: local){effect}",
                           f"remove rollout.parallelism.{name}, or set rollout.engine: vllm",
                           (engine,))
    if spec.cluster.scheduler == "local":
        for name, value in _changed(spec.cluster, ("partition", "account", "qos")):
            yield _warning(("cluster", name),
                           f"cluster.{name} is {_show(value)} but has no effect with "
                           "cluster.scheduler: local (only a Slurm request carries it)",
                           f"remove cluster.{name}, or set cluster.scheduler: slurm",
                           (("cluster", "scheduler"),))
    if spec.cluster.devices == "cpu":
        for name, value in _changed(spec.cluster, ("gpu_memory_gb",)):
            yield _warning(GPU_MEM, f"cluster.{name} is {_show(value)} but has no effect with "
                                    "cluster.devices: cpu (memory per GPU is compared for GPU "
                                    "runs only)", f"remove cluster.{name}",
                           (("cluster", "devices"),))


# --------------------------------------------------------------------------- memory


def _parts(parts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in parts.items())


def memory(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Estimated memory per GPU (compiler.estimates) against cluster.gpu_memory_gb.

    Trainer: over capacity without the optimizer state → error; over only with it → warning
    (fits with more of it offloaded: train.optimizer.cpu_offload / offload_fraction, as
    slime's large recipes run); within 10 % → warning. With local (unfused) attention the
    estimate includes its score matrices (its ``attention`` part); the Megatron trainer's
    SDPA core attention has none (runtime.capabilities.TRAINER_ATTENTION).
    Rollout: weights + one full-length sequence of KV cache over gpu_memory_gb ×
    gpu_memory_utilization → error (vLLM refuses to start); within 10 % → warning.
    Not compared for devices cpu."""
    if spec.cluster.devices == "cpu":
        return
    t = plan.train_memory
    cap = t.capacity_gb
    opt = spec.train.optimizer
    resident = t.total_gb - t.parts.get("optimizer", 0.0)
    related = (("train", "parallelism"), TRAIN_NODES, ("train", "recompute"),
               ("train", "optimizer", "cpu_offload"))
    detail = f"({_parts(t.parts)} GB; {t.notes[0] if t.notes else ''})"
    more = "raise PP or EP, or train.nodes (more expert-DP shards the optimizer)"
    attention = t.parts.get("attention", 0.0)
    if resident > cap:
        hint = ("set train.recompute: full, or " if spec.train.recompute != "full" else "") + more
        if attention > cap - (resident - attention):
            hint = (f"shorten the sequences ({plan.seq_len} tokens) or raise "
                    "train.parallelism.tensor (the local attention's score matrices, "
                    f"{attention:.1f} GB, grow with tokens² × heads / TP), or " + hint)
        yield _error(GPU_MEM, f"trainer needs about {resident:.1f} GB per GPU without optimizer "
                              f"state ({t.total_gb:.1f} GB with it) > {cap:g} GB {detail}",
                     hint, related)
    elif t.total_gb > cap:
        if not opt.cpu_offload:
            hint = f"set train.optimizer.cpu_offload: true, or {more}"
        elif opt.offload_fraction < 1:
            hint = (f"raise train.optimizer.offload_fraction (now {opt.offload_fraction:g}) "
                    f"to offload more of it, or {more}")
        else:  # the GPU keeps the fp32 main-weight shards (compiler.estimates)
            hint = more
        yield _warning(GPU_MEM, f"trainer estimate {t.total_gb:.1f} GB per GPU > {cap:g} GB; it "
                                f"fits only with less optimizer state on the GPU "
                                f"({t.parts['optimizer']:.1f} GB now) {detail}", hint, related)
    elif t.total_gb >= NEAR_MEMORY * cap:
        yield _warning(GPU_MEM, f"trainer estimate {t.total_gb:.1f} GB per GPU is within 10 % of "
                                f"{cap:g} GB {detail}", more, related)

    ro = plan.rollout_memory
    r_related = (("rollout", "parallelism"), GPU_MEM, ("rollout", "gpu_memory_utilization"))
    r_detail = f"({_parts(ro.parts)} GB)"
    r_hint = ("raise rollout.parallelism.tensor, set expert_parallel: true with data > 1, "
              "set rollout.fp8: true, or raise rollout.gpu_memory_utilization")
    if ro.total_gb > ro.capacity_gb:
        yield _error(("rollout", "parallelism"),
                     f"vLLM needs about {ro.total_gb:.1f} GB per GPU for weights and one "
                     f"{plan.seq_len}-token sequence > {ro.capacity_gb:.1f} GB usable {r_detail}",
                     r_hint, r_related)
    elif ro.total_gb >= NEAR_MEMORY * ro.capacity_gb:
        yield _warning(("rollout", "parallelism"),
                       f"vLLM estimate {ro.total_gb:.1f} GB per GPU is within 10 % of "
                       f"{ro.capacity_gb:.1f} GB usable: only {plan.rollout_max_sequences} "
                       f"full-length sequences fit per replica {r_detail}", r_hint, r_related)


# --------------------------------------------------------------------------- entry points


RULES: tuple[Rule, ...] = (
    training_grid,
    expert_grid,
    expert_sizes,
    attention_tp,
    checkpoint_head_dim,
    pipeline,
    sequence_parallel,
    context_parallel,
    batch_arithmetic,
    interleaved_schedule,
    rollout_grid,
    redundant_experts,
    fp8_rollout,
    stale_rollouts,
    colocated_placement,
    run_level,
    cluster_settings,
    zve_budgets,
    references,
    unused_settings,
    memory,
)


def check(spec: Spec, plan: Plan) -> list[Problem]:
    """Every problem of DESIGN.md §3 and the cross-section rules, errors and warnings."""
    problems: list[Problem] = []
    for rule in RULES:
        problems.extend(rule(spec, plan))
    return problems


def checked_plan(spec: Spec) -> Plan:
    """make_plan + check: SpecError with every error, else the plan with its warnings."""
    plan = make_plan(spec)
    problems = check(spec, plan)
    if any(p.severity == "error" for p in problems):
        raise SpecError(problems)
    return replace(plan, warnings=tuple(problems))

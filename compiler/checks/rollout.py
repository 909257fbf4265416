"""Checks of the rollout engines: their grid, redundant experts (EPLB), FP8 rollouts, stale
rollouts and colocated placement."""

from __future__ import annotations

import math
from collections.abc import Iterator

from compiler.checks._common import (
    ARCH,
    GPN,
    GPU_MEM,
    MOE,
    NEAR_MEMORY,
    R_DP,
    R_EP,
    R_NODES,
    R_TP,
    TRAIN_NODES,
    Path,
    _divisors,
    _error,
    _list,
    _or,
    _warning,
)
from compiler.plan import Plan
from spec.errors import Problem
from spec.models import Spec

# FP8 rollouts (fp8_rollout): FP8-rounded weights alone move the engines' mean |log-prob gap|
# to about 1e-3 (examples/tiny after 10 SFT steps, tests/runtime/test_run.py) – 1e-1 (a random
# MoE with peaked logits, tests/runtime/test_fp8.py); a weight-sync tolerance below this
# would stop an FP8 run on its numerics alone.
FP8_SYNC_TOLERANCE = 1e-2


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

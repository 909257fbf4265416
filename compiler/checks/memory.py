"""Estimated memory per GPU of the trainer and the rollout engines against the cluster's GPUs."""

from __future__ import annotations

from collections.abc import Iterator

from compiler.checks._common import (
    GPU_MEM,
    NEAR_MEMORY,
    TRAIN_NODES,
    _error,
    _warning,
)
from compiler.plan import Plan
from spec.errors import Problem
from spec.models import Spec

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

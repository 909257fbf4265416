"""The `rollout` section: the vLLM (or embedded) engine replicas, their layout and sampling."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from spec.models.base import NonNegInt, PosInt, Section


class RolloutParallelism(Section):
    """vLLM layout of one engine replica."""

    tensor: PosInt = Field(1, description="`vllm serve --tensor-parallel-size`.")
    data: PosInt = Field(
        1, description="`--data-parallel-size`: attention data-parallel ranks of one engine."
    )
    expert_parallel: bool = Field(
        False, description="`--enable-expert-parallel`: experts sharded over TP × DP ranks."
    )


class Sampling(Section):
    """Sampling parameters of rollouts (vLLM SamplingParams)."""

    temperature: Annotated[float, Field(ge=0)] = Field(1.0, description="Sampling temperature.")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="Nucleus sampling mass.")
    top_k: int = Field(-1, description="Top-k sampling; -1 disables (vLLM's convention).")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("top_k must be -1 (off) or a positive integer")
        return v


class Rollout(Section):
    """The rollout engines: vLLM replicas that sample n responses per prompt."""

    engine: Literal["vllm", "local"] = Field(
        "vllm", description="vllm: `vllm serve` replicas; local: the embedded torch server."
    )
    nodes: PosInt = Field(1, description="Nodes the rollout engines use inside the RL allocation.")
    placement: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="disaggregated: the engines have nodes of their own (train.nodes + "
        "rollout.nodes in the allocation); colocated: they share the trainer's nodes and GPUs "
        "(rollout.nodes = train.nodes), sleeping (vLLM `--enable-sleep-mode`, level 2) while "
        "the trainer steps and waking for the new weights. Synchronous only (max_staleness 0); "
        "trainer memory + gpu_memory_utilization of the GPU must fit it.",
    )
    parallelism: RolloutParallelism = Field(default_factory=RolloutParallelism)
    redundant_experts: NonNegInt = Field(
        0,
        description="Redundant expert replicas for expert-parallel load balancing (EPLB): vLLM "
        "`--enable-eplb` with `--eplb-config '{\"num_redundant_experts\": N}'`. Needs "
        "`parallelism.expert_parallel` and engine vllm; num_experts + N must be a multiple of "
        "the expert-parallel size TP·DP.",
    )
    n: PosInt = Field(description="Group size: responses sampled per prompt.")
    prompts_per_step: PosInt = Field(description="Prompts per RL step (before over-sampling).")
    max_tokens: PosInt = Field(description="Longest response, in tokens.")
    sampling: Sampling = Field(default_factory=Sampling)
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = Field(
        0.85, description="`--gpu-memory-utilization`: share of GPU memory vLLM may use."
    )
    max_num_seqs: PosInt = Field(256, description="`--max-num-seqs`: concurrent sequences per replica.")
    fp8: bool = Field(
        False,
        description="Sample with FP8 weights: vLLM `--quantization fp8`; the embedded engine "
        "rounds its linear and expert weights through float8_e4m3fn (per-output-channel absmax "
        "scales; embeddings, lm_head, norms and routers stay) at load and every weight update. "
        "Needs `algorithm.correction` tis or mis; on MoE models use `router_replay.mode: r3`.",
    )

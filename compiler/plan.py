"""The Plan: every value derived from a spec, computed once, here.

`make_plan(spec)` is the single place that turns a valid-shaped `Spec` into sizes,
budgets and estimates. Checks (`compiler.checks`) judge a plan; graph building, rendering
and `rlspec inspect` read it. Nothing else recomputes a derived value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spec.errors import Problem


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of the policy, in parameters (not bytes)."""

    total: int
    active: int  # per token: non-expert + shared + top_k routed experts
    embedding: int  # input embedding + output layer (once if tied)
    non_expert: int  # everything not inside routed experts (incl. embedding, shared experts)
    expert: int  # all routed experts of all MoE layers
    moe_layers: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, in GB (10^9), with the capacity they are compared against."""

    parts: dict[str, float]  # e.g. {"weights": .., "grads": .., "optimizer": .., "activations": ..}
    total_gb: float
    capacity_gb: float
    notes: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.total_gb / self.capacity_gb


@dataclass(frozen=True)
class StageBudget:
    """Rollout budget of one zero-variance-elimination stage, per RL step unless noted."""

    index: int  # position in spec.filters
    type: str
    rollouts_per_step: float  # policy-equivalent rollouts this stage adds per step (expected)
    worst_case_rollouts_per_step: float
    can_fill_batch_worst_case: bool
    one_time_rollouts: float = 0.0  # offline screening (proxy-cost weighted, amortised)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Derived sizes of one run. Field names are shown verbatim by `rlspec inspect --json`."""

    # trainer (Megatron-core)
    train_world_size: int  # W = train.nodes × gpus_per_node
    data_parallel: int  # DP = W / (TP·PP·CP)
    expert_tensor_parallel: int  # ETP, resolved (unset → TP)
    expert_tensor_defaulted: bool  # ETP came from Megatron's default (= TP)
    expert_data_parallel: int  # W / (ETP·EP·PP)
    pipeline_layers: tuple[int, ...]  # layers per pipeline stage
    micro_batches_per_step: int  # global_batch / (micro_batch · DP)
    # rollout (vLLM)
    rollout_world_size: int  # R = rollout.nodes × gpus_per_node
    gpus_per_replica: int  # TP·DP of one engine
    rollout_replicas: int  # R / gpus_per_replica
    rollout_expert_parallel: int | None  # TP·DP when expert_parallel, else None
    # run
    rl_nodes: int  # nodes of the RL allocation (rollout + trainer)
    seq_len: int  # max prompt tokens + max response tokens
    rollouts_per_step: int  # prompts_per_step × n, before filters
    optimizer_steps_per_rollout: int  # (rollouts_per_step / global_batch) × ppo_epochs
    stage_budgets: tuple[StageBudget, ...]
    expected_rollouts_per_step: float  # with every stage's additions
    params: ParamCount
    train_memory: MemoryEstimate
    rollout_memory: MemoryEstimate
    routing_dtype: str | None  # storage dtype of replayed expert ids (uint8 / int16)
    routing_bytes_per_token: int  # moe_layers × top_k × itemsize; 0 without replay
    warnings: tuple[Problem, ...] = field(default_factory=tuple)

"""The root `Spec`, one RL run, and the small top-level sections only it holds: `system`
(overlap and balancing), `eval` and `export`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from spec.models.algorithm import Algorithm, RouterReplay
from spec.models.base import NonNegInt, PosFloat, PosInt, Section
from spec.models.cluster import Cluster
from spec.models.data import Data
from spec.models.filters import FilterStage
from spec.models.model import Model
from spec.models.reward import Reward
from spec.models.rollout import Rollout
from spec.models.train import SFT, Train


class System(Section):
    """Overlap and balancing: the system wastes no GPU time."""

    reward_overlap: bool = Field(True, description="Score rollouts while others still generate.")
    reward_workers: PosInt = Field(
        1,
        description="Worker processes that detokenize and score finished rollouts (the "
        "driver's pool), while generation goes on; 1: the driver's own thread.",
    )
    length_balancing: bool = Field(
        True,
        description="Balance work by length: the trainer's micro-batches by token count across "
        "data-parallel ranks, and each step's prompt groups across the rollout replicas by "
        "predicted generation length (longest first to the least-loaded replica). Off: "
        "micro-batches in order, groups round-robin.",
    )
    max_staleness: NonNegInt = Field(
        0, description="Policy versions a rollout may lag (0: synchronous on-policy)."
    )
    weight_sync: Literal["nccl", "ipc", "disk"] = Field(
        "disk",
        description="How new weights reach the rollout engines: disk reloads each step's "
        "weights folder; ipc maps the trainer's tensors from shared memory on its node "
        "(vLLM's IPC update, `--weight-transfer-config`; CPU runs with the embedded engine, "
        "refused on GPUs until CUDA IPC is built); nccl has the trainer broadcast each version "
        "to the engines in vLLM's NCCL wire format (a gloo group on the CPU with the embedded "
        "engine; refused on GPUs and with vLLM until the trainer joins vLLM's NCCL group).",
    )
    startup_timeout_s: PosFloat = Field(
        1800.0,
        description="Seconds the RL job's driver (and a job serving an engine: screen, eval) "
        "waits for its engines to answer and for the trainer's first heartbeat: container "
        "start, weight loading and compilation on every node. A model of hundreds of GB read "
        "from a shared file system may need more. RLSPEC_STARTUP_TIMEOUT, where set, wins.",
    )
    weight_sync_tolerance: PosFloat = Field(
        0.05,
        description="Largest mean |log-prob difference| between the rollout engines and the "
        "trainer on each step's response tokens (before the update uses them), and on the "
        "probe sequence the driver checks after every weight load: past it the run stops, "
        "since the engines do not serve the trainer's weights (a sync that did not take "
        "effect). bf16 engines differ by about 1e-3; with equal fp32 numerics use about 1e-4.",
    )


class Eval(Section):
    """Held-out evaluation before and after training, and every `every_steps`."""

    enabled: bool = Field(True, description="Add evaluation jobs.")
    every_steps: NonNegInt = Field(0, description="Evaluate inside the run this often; 0: never.")
    samples: PosInt = Field(1, description="Samples per prompt (pass@1 is their mean).")
    temperature: Annotated[float, Field(ge=0)] = Field(0.0, description="0 means greedy.")
    max_tokens: PosInt | None = Field(None, description="Default: rollout.max_tokens.")


class Export(Section):
    """Export of the final policy for serving."""

    format: Literal["hf"] = Field("hf", description="Output format.")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="Exported dtype.")


class Spec(Section):
    """One RL run."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="Run name: lower-case letters, digits, '-' and '_' (a Slurm job-name prefix).",
    )
    description: str = Field("", description="Free text.")
    model: Model
    cluster: Cluster = Field(default_factory=Cluster)
    sft: SFT | None = Field(None, description="Supervised cold start before RL.")
    train: Train
    rollout: Rollout
    data: Data
    reward: Reward
    filters: list[FilterStage] = Field(
        default_factory=list, description="Zero-variance elimination stages, in order."
    )
    algorithm: Algorithm = Field(default_factory=Algorithm)
    router_replay: RouterReplay = Field(default_factory=RouterReplay)
    system: System = Field(default_factory=System)
    eval: Eval = Field(default_factory=Eval)
    export: Export | None = Field(default_factory=Export, description="Final export; null skips it.")

    @field_validator("filters")
    @classmethod
    def _stage_order(cls, v: list) -> list:
        kinds = [s.type for s in v]
        for kind in kinds:
            if kinds.count(kind) > 1:
                raise ValueError(f"stage {kind!r} is listed twice")
        # The order is the user's, except where one stage consumes another's output.
        if "offline_pass_rate" in kinds and kinds[0] != "offline_pass_rate":
            raise ValueError("offline_pass_rate screens prompts before RL: list it first")
        if "reward_shaping" in kinds and "flat_groups" in kinds and (
            kinds.index("reward_shaping") > kinds.index("flat_groups")
        ):
            raise ValueError("reward_shaping breaks ties, so it must come before flat_groups")
        return v

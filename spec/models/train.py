"""The `train` section (the trainer: parallel layout, batches, optimizer, checkpoints) and
the `sft` section, the supervised cold start that runs on the same trainer."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from spec.models.base import NonNegInt, PosFloat, PosInt, Section, Seed


class TrainParallelism(Section):
    """Megatron-core parallel layout of the trainer."""

    tensor: PosInt = Field(1, description="Tensor parallel size TP (`--tensor-model-parallel-size`).")
    pipeline: PosInt = Field(1, description="Pipeline parallel size PP (`--pipeline-model-parallel-size`).")
    virtual_pipeline: PosInt | None = Field(
        None,
        description="Virtual pipeline stages per rank (interleaved schedule; "
        "`--num-virtual-stages-per-pipeline-rank`).",
    )
    context: PosInt = Field(1, description="Context parallel size CP (`--context-parallel-size`).")
    expert: PosInt = Field(1, description="Expert parallel size EP (`--expert-model-parallel-size`).")
    expert_tensor: PosInt | None = Field(
        None,
        description="Expert tensor parallel size ETP (`--expert-tensor-parallel-size`); "
        "unset means ETP = TP, Megatron's default.",
    )
    sequence_parallel: bool = Field(
        False, description="Megatron sequence parallelism (`--sequence-parallel`); needs TP > 1."
    )
    first_pipeline_stage_layers: PosInt | None = Field(
        None, description="Layers on the first pipeline stage (`--decoder-first-pipeline-num-layers`)."
    )
    last_pipeline_stage_layers: PosInt | None = Field(
        None, description="Layers on the last pipeline stage (`--decoder-last-pipeline-num-layers`)."
    )


class Optimizer(Section):
    """Adam with Megatron's distributed optimizer (state sharded over data-parallel ranks)."""

    name: Literal["adam"] = Field("adam", description="Optimizer.")
    lr: PosFloat = Field(1e-6, description="Peak learning rate.")
    min_lr: Annotated[float, Field(ge=0)] = Field(0.0, description="Final learning rate.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.01, description="Decoupled weight decay.")
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="Adam β1.")
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = Field(0.98, description="Adam β2.")
    adam_eps: PosFloat = Field(1e-8, description="Adam ε.")
    clip_grad: PosFloat = Field(1.0, description="Global gradient-norm clip.")
    warmup_steps: NonNegInt = Field(0, description="Linear warm-up optimizer steps.")
    distributed: bool = Field(
        True, description="Shard optimizer state over data-parallel ranks (`--use-distributed-optimizer`)."
    )
    cpu_offload: bool = Field(
        False,
        description="Keep optimizer state in host memory and run its Adam step on the CPU "
        "(megatron-core's hybrid CPU optimizer: `--optimizer-cpu-offload "
        "--use-precision-aware-optimizer`); the GPU then holds weights, gradients and "
        "activations only. Needs `distributed: true`; GPU runs of the Megatron trainer only.",
    )
    offload_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0,
        description="Share of the optimizer state kept in host memory with `cpu_offload` "
        "(`--optimizer-offload-fraction`); the rest stays on the GPU.",
    )

    @model_validator(mode="after")
    def _offload_needs_distributed(self) -> Optimizer:
        if self.cpu_offload and not self.distributed:
            raise ValueError("cpu_offload needs distributed: true (megatron-core's hybrid CPU "
                             "optimizer runs inside the distributed optimizer)")
        return self


class Checkpointing(Section):
    """How often the trainer saves, and how many checkpoints it keeps."""

    interval: PosInt = Field(10, description="Save every this many RL steps.")
    keep: PosInt = Field(3, description="Newest checkpoints kept.")


class Train(Section):
    """The trainer job: backend, nodes, parallel layout, batch sizes, optimizer."""

    backend: Literal["megatron", "local"] = Field(
        "megatron", description="megatron: megatron-core trainer; local: the embedded torch trainer."
    )
    nodes: PosInt = Field(1, description="Nodes the trainer uses inside the RL allocation.")
    parallelism: TrainParallelism = Field(default_factory=TrainParallelism)
    micro_batch_size: PosInt = Field(1, description="Responses per micro-batch per data-parallel rank.")
    global_batch_size: PosInt = Field(description="Responses per optimizer step.")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="Parameter/compute precision.")
    recompute: Literal["none", "selective", "full"] = Field(
        "selective", description="Activation recomputation (`--recompute-granularity`)."
    )
    steps: PosInt = Field(description="RL steps (rollout batches) to run.")
    rollout_budget: PosInt | None = Field(
        None, description="Stop RL after the step whose rollouts bring the total to this many "
        "(compares filter policies at an equal budget); none runs every step.")
    seed: Seed = Field(1234, description="Random seed of the run: the trainer, the filters, the "
                      "screen and eval samples, and every RL sampling request (`runtime.seeds`).")
    optimizer: Optimizer = Field(default_factory=Optimizer)
    checkpoint: Checkpointing = Field(default_factory=Checkpointing)


# The SFT optimizer's fixed settings (Adam at a constant sft.lr, no weight decay, gradients
# clipped to norm 1), the same on the embedded trainer and on Megatron (train.sh's flags).
SFT_OPTIMIZER = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "weight_decay": 0.0,
                 "clip_grad": 1.0}


class SFT(Section):
    """A short supervised cold start before RL (the paper's pipeline starts with SFT): the
    embedded trainer, or with train.backend megatron the Megatron trainer in the train layout."""

    steps: PosInt = Field(description="Optimizer steps of supervised fine-tuning.")
    lr: PosFloat = Field(1e-4, description="Learning rate.")
    batch_size: PosInt = Field(32, description="Examples per step.")

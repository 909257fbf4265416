"""The Megatron trainer's layout flags (jobs/rl/train.sh) it does not run yet: reached by a
train.sh edited by hand (validate refuses the settings in the spec that would render them)."""

from __future__ import annotations

from typing import Any

from runtime.capabilities.refusal import ARCH, Refusal, SpecPath

# Megatron-LM flags of jobs/rl/train.sh → the spec field that renders each.
FLAG_PATHS: dict[str, SpecPath] = {
    "expert_tensor_parallel_size": ("train", "parallelism", "expert_tensor"),
    "context_parallel_size": ("train", "parallelism", "context"),
    "num_virtual_stages_per_pipeline_rank": ("train", "parallelism", "virtual_pipeline"),
    "decoder_first_pipeline_num_layers": ("train", "parallelism", "first_pipeline_stage_layers"),
    "decoder_last_pipeline_num_layers": ("train", "parallelism", "last_pipeline_stage_layers"),
    "tensor_model_parallel_size": ("train", "parallelism", "tensor"),
    "untie_embeddings_and_output_weights": (*ARCH, "tie_embeddings"),
    "optimizer_cpu_offload": ("train", "optimizer", "cpu_offload"),
    "optimizer_offload_fraction": ("train", "optimizer", "offload_fraction"),
}


def megatron_flag_refusals(args: Any) -> list[Refusal]:
    """Layouts of the parsed train.sh flags (``runtime.megatron.args``) that the Megatron
    trainer does not run yet. The trainer calls this at start; the RL job's preflight calls
    it on the bundle's train.sh, so an edited flag is checked too."""
    out: list[Refusal] = []

    def refuse(flag: str, message: str, hint: str) -> None:
        out.append(Refusal("megatron_layout", FLAG_PATHS[flag], message, hint))

    if args.optimizer_cpu_offload and not args.use_distributed_optimizer:
        refuse("optimizer_cpu_offload",
               "--optimizer-cpu-offload runs inside the distributed optimizer "
               "(--use-distributed-optimizer)", "set train.optimizer.distributed: true")
    if args.optimizer_cpu_offload and not 0 < args.optimizer_offload_fraction <= 1:
        refuse("optimizer_offload_fraction",
               f"--optimizer-offload-fraction {args.optimizer_offload_fraction} is not in (0, 1]",
               "set train.optimizer.offload_fraction between 0 (exclusive) and 1")
    return out

"""One rank of a Megatron-core policy, built from a job's Megatron-LM flags.

The RL trainer (``runtime.jobs.train``) and the SFT job (``runtime.jobs.sft``) start their
model the same way: refuse a layout the trainer cannot run (the flag rules of
``runtime.capabilities``, which ``rlspec validate`` runs too), check the flags against the
HF checkpoint's architecture, initialise the process groups (NCCL on GPUs, gloo on the CPU)
and build this rank's GPTModel, or its model chunks under virtual pipeline stages
(``runtime.megatron.model.build_gpt_chunks``). Weights are loaded by the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["MegatronPolicy", "build_policy"]


@dataclass
class MegatronPolicy:
    """This rank's model and what the trainer around it needs."""

    chunks: list[Any]  # this rank's GPTModel(s): one, or one per virtual pipeline stage
    groups: Any  # runtime.megatron.parallel's process groups
    hf_config: Any  # the HF checkpoint's config (architecture, vocabulary)
    tokenizer: Any
    dtype: Any  # torch dtype of the parameters
    layout: dict[str, int]  # tp, ep, pp, etp
    vpp: int | None  # model chunks per rank, None without virtual stages
    overrides: dict[str, Any]  # TransformerConfig fields from the flags
    main: bool  # rank 0: reads and writes the shared files
    describe: str  # one line for the log

    @property
    def module(self) -> Any:
        """The model as the trainer takes it: the chunks under virtual stages, else the one."""
        return self.chunks if self.vpp else self.chunks[0]

    def build_like(self, **kwargs: Any) -> list[Any]:
        """Another model of the same layout (a frozen reference), without routing replay."""
        from runtime.megatron.model import build_gpt_chunks

        return build_gpt_chunks(self.hf_config, self.groups, vpp=self.vpp, dtype=self.dtype,
                                **self.layout, **self.overrides, **kwargs)


def build_policy(args: Any, devices: str, policy_path: str | None, *, routing_replay: bool,
                 hf: tuple[Any, Any] | None = None) -> MegatronPolicy:
    """Process groups and this rank's model for the flags ``args`` (module doc), of the HF
    config and tokenizer at ``policy_path`` or given as ``hf`` (a Megatron checkpoint's,
    which has neither). The rank and world come from torchrun's ``RANK`` / ``WORLD_SIZE``,
    the rendezvous from ``RLSPEC_RENDEZVOUS`` (``env://`` by default)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from runtime.capabilities import megatron_flag_refusals
    from runtime.megatron.args import check_architecture, model_overrides
    from runtime.megatron.model import build_gpt_chunks
    from runtime.megatron.parallel import init_parallel, use_devices

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    backend, forced = use_devices(devices)
    dtype = forced or (torch.bfloat16 if args.bf16 else torch.float32)
    layout = {"tp": args.tensor_model_parallel_size, "ep": args.expert_model_parallel_size,
              "pp": args.pipeline_model_parallel_size,
              # Megatron-LM's default: --expert-tensor-parallel-size unset → ETP = TP
              "etp": args.expert_tensor_parallel_size or args.tensor_model_parallel_size}
    refused = megatron_flag_refusals(args)  # the layouts `rlspec validate` refuses too
    if refused:
        raise NotImplementedError("; ".join(f"{r.message} ({r.hint})" for r in refused))
    if hf is None:
        hf = AutoConfig.from_pretrained(policy_path), AutoTokenizer.from_pretrained(policy_path)
    hf_config, tokenizer = hf
    check_architecture(args, hf_config)
    vpp = args.num_virtual_stages_per_pipeline_rank or None
    groups = init_parallel(rank, world, os.environ.get("RLSPEC_RENDEZVOUS", "env://"),
                           backend=backend, seed=args.seed, vpp=vpp,
                           cp=args.context_parallel_size, **layout)
    overrides = model_overrides(args)
    chunks = build_gpt_chunks(hf_config, groups, vpp=vpp, routing_replay=routing_replay,
                              dtype=dtype, **layout, **overrides)
    dp = world // (layout["tp"] * layout["pp"] * args.context_parallel_size)
    describe = (f"world {world} (TP {layout['tp']}, PP {layout['pp']}, EP {layout['ep']}, "
                f"ETP {layout['etp']}, DP {dp}), {str(dtype).removeprefix('torch.')}, "
                f"{backend} backend")
    return MegatronPolicy(chunks=list(chunks), groups=groups, hf_config=hf_config,
                          tokenizer=tokenizer, dtype=dtype,
                          layout=layout, vpp=vpp, overrides=overrides, main=rank == 0,
                          describe=describe)

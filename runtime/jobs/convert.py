"""Jobs ``convert`` and ``to_hf``: HF ↔ Megatron checkpoints for ``train.backend: megatron``.

``convert`` (HF policy → output ``policy_megatron``): builds the spec's GPTModel
(``runtime.megatron.model``, TP = EP = 1), copies the HF weights in (``load_hf_weights`` of
``runtime.megatron.hf_weights``) and writes a Megatron-LM checkpoint root
(``runtime.megatron.checkpoint``): ``latest_checkpointed_iteration.txt`` = ``release`` and
``release/``, a dist_checkpointing directory whose ``model`` shards any TP/EP layout of the
trainer loads.

``to_hf`` (the user's Megatron checkpoint → output ``policy_init``, for the rollout engines):
the reverse, through ``gather_full_state_dict`` → ``megatron_to_hf`` → ``save_policy``. A
Megatron checkpoint carries no tokenizer: it comes from ``model.tokenizer``, and the HF
config from ``model.architecture``.

One process holds the whole model (CPU memory of one node); parameters are float32 on
``cluster.devices: cpu`` and ``train.precision`` on GPUs, as the trainer loads them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from runtime.jobs.common import JobContext, JobError, run_job


def _dtype(ctx: JobContext, forced: Any) -> Any:
    import torch

    if forced is not None:
        return forced
    return torch.bfloat16 if ctx.model_spec.train.precision == "bf16" else torch.float32


def run(ctx: JobContext) -> None:
    from runtime.megatron import checkpoint as ckpt
    from runtime.megatron.hf_weights import gather_full_state_dict, load_hf_weights, megatron_to_hf
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel, use_devices
    from runtime.policy import load_policy, policy_config, policy_from_state_dict, save_policy

    if ctx.rank != 0:
        return
    backend, forced = use_devices(ctx.model_spec.cluster.devices)
    dtype = _dtype(ctx, forced)
    with tempfile.TemporaryDirectory(prefix="rlspec-convert-") as tmp:
        pg = init_parallel(0, 1, os.path.join(tmp, "rendezvous"), backend=backend,
                           seed=ctx.model_spec.train.seed)
        try:
            if "policy_megatron" in ctx.outputs:
                src = next(n for n, a in ctx.inputs.items() if a.kind == "hf_checkpoint")
                hf, _ = load_policy(ctx.input_path(src))
                model = build_gpt_model(hf.config, pg, dtype=dtype)
                load_hf_weights(model, hf.state_dict(), hf.config)
                with ctx.atomic_output("policy_megatron", source=str(ctx.input_path(src))) as out:
                    ckpt.save_model(model, out)
                ctx.log.info("converted %s to a Megatron checkpoint (%s) at %s",
                             ctx.input_path(src), str(dtype).removeprefix("torch."),
                             ctx.output_path("policy_megatron"))
            else:
                from transformers import AutoTokenizer

                tokenizer_path = ctx.model_spec.model.tokenizer
                if not tokenizer_path:
                    raise JobError("a Megatron checkpoint carries no tokenizer: set "
                                   "model.tokenizer to the tokenizer's folder")
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
                config = policy_config(ctx.section("model.architecture"), tokenizer)
                model = build_gpt_model(config, pg, dtype=dtype)
                read = ckpt.load_model(model, ctx.input_path("user_checkpoint"))
                hf = policy_from_state_dict(config, megatron_to_hf(
                    gather_full_state_dict(model), config))
                save_policy(hf, tokenizer, ctx.output_path("policy_init"), job=ctx.job,
                            source=str(read))
                ctx.log.info("converted the Megatron checkpoint %s to HF at %s", read,
                             ctx.output_path("policy_init"))
        finally:
            destroy_parallel()


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

"""Jobs ``convert`` and ``to_hf``: HF ↔ Megatron checkpoints for ``train.backend: megatron``.

Both run on the RL trainer's nodes, in its layout and with its Megatron-LM flags
(``jobs/<job>/train.sh``, one process per GPU): each rank holds the shard of the model the
trainer's rank will hold, so a model the trainer fits, the conversion fits too (one process
holding a 245 B model whole would not: about 490 GB in bf16).

``convert`` (HF policy → output ``policy_megatron``): every rank reads its own layers and
experts of the HF folder (``runtime.megatron.hf_folder.load_hf_folder``), and the ranks write
a Megatron-LM checkpoint root together (``runtime.megatron.checkpoint.save_model``):
``latest_checkpointed_iteration.txt`` = ``release`` and ``release/``, a dist_checkpointing
directory whose ``model`` shards load into any TP/EP/PP layout.

``to_hf`` (the user's Megatron checkpoint → output ``policy_init``, for the rollout engines):
the ranks load the checkpoint, resharded to the layout, and write the HF folder, each pipeline
stage its own layers (``save_hf_folder``). A Megatron checkpoint carries no tokenizer: it
comes from ``model.tokenizer``, and the HF config from ``model.architecture``.

Parameters are float32 on ``cluster.devices: cpu`` and ``train.precision`` on GPUs (the
rendered ``--bf16``), as the trainer loads them. Both outputs appear whole or not at all.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from runtime.jobs.common import JobContext, JobError, run_job


def run(ctx: JobContext, flags: Sequence[str]) -> None:
    """This rank's share of the conversion (module doc)."""
    from runtime.megatron import checkpoint as ckpt
    from runtime.megatron.args import parse_megatron_args
    from runtime.megatron.hf_folder import load_hf_folder, save_hf_folder
    from runtime.megatron.parallel import destroy_parallel
    from runtime.megatron.setup import build_policy

    if ctx.model_spec.train.backend != "megatron":
        raise JobError(f"the conversion runs on the Megatron trainer, but train.backend is "
                       f"{ctx.model_spec.train.backend}")
    args = parse_megatron_args(["--config", str(ctx.config_path), *flags], checkpoints=False)
    devices = ctx.spec["cluster"]["devices"]
    try:
        if "policy_megatron" in ctx.outputs:
            src = ctx.input_path(next(n for n, a in ctx.inputs.items() if a.kind == "hf_checkpoint"))
            policy = build_policy(args, devices, str(src), routing_replay=False)
            load_hf_folder(policy.module, policy.hf_config, src)  # this rank's layers only
            with ckpt.shared_atomic_dir(ctx.output_path("policy_megatron"), job=ctx.job,
                                        artifact="policy_megatron", source=str(src)) as out:
                ckpt.save_model(policy.module, out)
            if policy.main:
                ctx.log.info("converted %s to a Megatron checkpoint at %s (%s)", src,
                             ctx.output_path("policy_megatron"), policy.describe)
        else:
            from transformers import AutoTokenizer

            from runtime.policy import policy_config

            tokenizer_path = ctx.model_spec.model.tokenizer
            if not tokenizer_path:
                raise JobError("a Megatron checkpoint carries no tokenizer: set "
                               "model.tokenizer to the tokenizer's folder")
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            config = policy_config(ctx.section("model.architecture"), tokenizer)
            policy = build_policy(args, devices, None, routing_replay=False,
                                  hf=(config, tokenizer))
            read = ckpt.load_model(policy.module, ctx.input_path("user_checkpoint"))
            save_hf_folder(policy.module, config, tokenizer, ctx.output_path("policy_init"),
                           job=ctx.job, source=str(read))
            if policy.main:
                ctx.log.info("converted the Megatron checkpoint %s to HF at %s (%s)", read,
                             ctx.output_path("policy_init"), policy.describe)
    finally:
        # a gloo group left to its destructor at exit can abort the process
        destroy_parallel()


def main(argv: Sequence[str] | None = None) -> int:
    """``--config PATH [--force]`` and the Megatron-LM flags of ``jobs/<job>/train.sh``."""
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--config")
    ap.add_argument("--force", action="store_true")
    known, flags = ap.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    own = (["--config", known.config] if known.config else []) + (["--force"] if known.force else [])
    return run_job(lambda ctx: run(ctx, flags), own, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

"""Job ``init``: a randomly initialised policy for a spec without ``model.checkpoint``.

Builds the character-level tokenizer and the HF model of ``spec.model.architecture``
(``runtime.policy``: Qwen3-MoE, or dense Qwen3) with seed ``spec.train.seed`` and saves an
HF checkpoint folder (config.json, model.safetensors, generation_config.json, tokenizer
files, ``.complete``) into output ``policy_init``. Float32 weights: the embedded engines
run on CPU; an export job converts the dtype.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from runtime.jobs.common import JobContext, run_job


def run(ctx: JobContext) -> None:
    # Imported here so that a skipped job does not pay for importing torch/transformers.
    from runtime.policy import build_policy, build_tokenizer, count_parameters, save_policy

    arch = ctx.section("model.architecture")
    seed = ctx.model_spec.train.seed
    tokenizer = build_tokenizer(int(arch["vocab_size"]),
                                model_max_length=arch["max_position_embeddings"])
    model = build_policy(arch, tokenizer, seed)
    counts = count_parameters(model)
    ctx.log.info("built %s: %d parameters (%d in experts, %d active per token), seed %d",
                 type(model).__name__, counts["total"], counts["expert"], counts["active"], seed)
    planned = ctx.derived.get("params", {}).get("total")
    if planned:
        # The compiler's estimate leaves out the norms' weights (a few per layer).
        ctx.log.info("compiler's estimate: %d parameters (norm weights not counted there)", planned)
    if ctx.rank != 0:
        return
    out = save_policy(model, tokenizer, ctx.output_path("policy_init"),
                      job=ctx.job, seed=seed, parameters=counts["total"])
    ctx.log.info("saved the initial policy to %s", out)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

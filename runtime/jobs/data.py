"""Job ``data``: generate the train/eval splits of the embedded arithmetic task.

Reads ``spec.data.generator`` (seed, sizes, digits, operations) and ``spec.data.prompt_key``
/ ``answer_key``; writes into output ``dataset`` (atomically, with its ``.complete`` marker)::

    train.jsonl   {"id", <prompt_key>, <answer_key>, "difficulty"} per line
    eval.jsonl    the same, disjoint from train
    meta.json     generator params, keys, counts, difficulty histograms, longest prompt/answer

See ``runtime.tasks.arithmetic`` for the sampling and the difficulty measure.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from runtime.jobs.common import JobContext, JobError, run_job
from runtime.tasks.arithmetic import ArithmeticConfig, write_dataset


def run(ctx: JobContext) -> None:
    data = ctx.section("data")
    generator = data["generator"]
    if not generator:
        raise JobError("spec.data.generator is not set: this job generates the embedded task only")
    try:
        cfg = ArithmeticConfig.from_spec(generator)
    except (TypeError, ValueError) as exc:
        raise JobError(f"spec.data.generator: {exc}") from None
    prompt_key, answer_key = data["prompt_key"], data["answer_key"]
    if len({"id", "difficulty", prompt_key, answer_key}) != 4:
        raise JobError(f"spec.data.prompt_key {prompt_key!r} / answer_key {answer_key!r} must "
                       "differ from each other and from 'id' and 'difficulty'")
    if ctx.rank != 0:  # one writer; other tasks of a multi-node allocation have nothing to do
        return
    with ctx.atomic_output("dataset") as tmp:
        meta = write_dataset(tmp, cfg, prompt_key=prompt_key, answer_key=answer_key)
    ctx.log.info("wrote %d train and %d eval prompts (difficulty %s–%s) to %s",
                 meta["train"]["count"], meta["eval"]["count"],
                 min(meta["train"]["difficulty"], key=int), max(meta["train"]["difficulty"], key=int),
                 ctx.output_path("dataset"))
    # Prompts are characters and the policy's tokenizer is character-level: chars = tokens.
    longest = max(meta["train"]["max_prompt_chars"], meta["eval"]["max_prompt_chars"])
    limit = data["max_prompt_tokens"]
    if longest > limit:
        ctx.log.warning("the longest prompt has %d characters (tokens) > data.max_prompt_tokens %d: "
                        "the jobs that read prompts drop the longer ones",
                        longest, limit)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

r"""Job ``evaluate`` (``eval_before``, ``eval_after``): held-out accuracy of a policy.

The policy is the job's single ``hf_checkpoint`` input; the prompts are
the eval split (``runtime.prompts.eval_file``). Every prompt gets ``spec.eval.samples`` answers from the
engine of ``rollout.engine`` (``runtime.jobs.sampled``: the vLLM replicas the launch script
started on every node of the job, one task spreading the prompts over them; or the embedded
``LocalEngine`` on the spec's device, each node's task taking its share) at ``spec.eval.temperature`` (0 → greedy), at most
``spec.eval.max_tokens`` (else ``spec.rollout.max_tokens``) tokens, stopping at the
tokenizer's eos. Each answer is scored with the spec's verifiers
(``build_reward(spec.reward).score``: the weighted verifier score, never a judge)::

    correct_ij = score_ij ≥ 1 − 1e-9
    accuracy   = (1 / (N · S)) Σ_ij correct_ij
    by_difficulty[d] = accuracy over the prompts of difficulty d (rows with a "difficulty")

Output (the job's single output, written atomically): ``metrics.json`` ``{accuracy,
mean_score, n_prompts, samples, samples_per_prompt, mean_response_tokens, by_difficulty,
temperature, max_tokens, seed}`` and ``samples.jsonl``, one ``{prompt_id, prompt,
response, answer, score, correct, tokens, finish_reason}`` per answer.
Sampling is seeded with ``spec.train.seed`` (sample j of every prompt uses seed + j), so
the result does not depend on how the prompts are batched. Each task saves its prompts'
answers batch by batch: an evaluation killed, preempted or timed out, run again on the same
checkpoint, samples only the prompts it had not finished.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from runtime.jobs.common import (
    JobContext,
    atomic_write_json,
    run_job,
    single_input,
    single_output,
)
from runtime.jobs.sampled import (
    Sample,
    fingerprint,
    forget_progress,
    open_engine,
    progress_for,
    sample_resumably,
    split_over_nodes,
)

_CORRECT_TOL = 1e-9


def run(ctx: JobContext) -> None:
    from runtime.prompts import drop_overlong, eval_max_tokens, eval_rows
    from runtime.rewards import build_reward

    data = ctx.section("data")
    prompt_key, answer_key = data["prompt_key"], data["answer_key"]
    n, temperature = ctx.model_spec.eval.samples, ctx.model_spec.eval.temperature
    max_tokens = eval_max_tokens(ctx.spec)
    seed = ctx.model_spec.train.seed
    reward = build_reward(ctx.section("reward"))
    policy = ctx.input_path(single_input(ctx, "hf_checkpoint"))
    out_name = single_output(ctx)

    rows = eval_rows(ctx)
    engine = open_engine(ctx, policy, seed, seq_len=ctx.derived.get("eval_seq_len"))
    rows = drop_overlong(rows, engine.tokenizer, data, ctx.log, "eval")
    keyed = {str(i): row for i, row in rows.items()}
    # On vLLM one task spreads the prompts over every replica; the embedded engine runs one
    # task per node, each on its share.
    nodes = 1 if ctx.spec["rollout"]["engine"] == "vllm" else ctx.model_spec.rollout.nodes
    ctx.log.info("evaluating %s on %d prompts × %d sample(s) over %d task(s), T=%g, max %d "
                 "tokens", policy, len(rows), n, nodes, temperature, max_tokens)
    work = fingerprint(ctx, keyed, n, temperature, max_tokens, seed, checkpoints=[policy])

    def scored(key: str, answers: list[Sample]) -> list[dict[str, Any]]:
        row = keyed[key]
        prompt, reference = str(row[prompt_key]), str(row[answer_key])
        out = []
        for a in answers:
            score = float(reward.score(prompt, a.text, reference))
            out.append({"prompt_id": row.get("id", int(key)), "prompt": prompt,
                        "response": a.text, "answer": reference, "score": score,
                        "correct": score >= 1.0 - _CORRECT_TOL, "tokens": a.tokens,
                        "finish_reason": a.finish_reason})
        return out

    def evaluate(keys: list[str]) -> dict[str, Any]:
        return sample_resumably(ctx, engine, {k: str(keyed[k][prompt_key]) for k in keys},
                                progress_for(ctx, out_name, work), scored, n=n,
                                max_tokens=max_tokens, temperature=temperature, seed=seed)

    by_key = split_over_nodes(ctx, list(keyed), nodes, work, evaluate, out_name)
    if by_key is None:  # another task merges and writes
        return
    records: list[dict[str, Any]] = []
    by_diff: dict[str, list[int]] = defaultdict(list)
    for key, row in keyed.items():
        records.extend(by_key[key])
        if "difficulty" in row:
            by_diff[str(row["difficulty"])].extend(int(r["correct"]) for r in by_key[key])
    total = len(records)
    metrics = {
        "accuracy": sum(r["correct"] for r in records) / total,
        "mean_score": sum(r["score"] for r in records) / total,
        "n_prompts": len(rows),
        "samples": total,
        "samples_per_prompt": n,
        "mean_response_tokens": sum(r["tokens"] for r in records) / total,
        "by_difficulty": {d: sum(v) / len(v)
                          for d, v in sorted(by_diff.items(), key=lambda kv: _num(kv[0]))},
        "temperature": temperature,
        "max_tokens": max_tokens,
        "seed": seed,
        "policy": str(policy),
    }
    ctx.log.info("accuracy %.4f over %d samples (mean %.2f response tokens)",
                 metrics["accuracy"], total, metrics["mean_response_tokens"])
    with ctx.atomic_output(out_name, accuracy=metrics["accuracy"]) as tmp:
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        atomic_write_json(tmp / "metrics.json", metrics)
    forget_progress(ctx, out_name)


def _num(key: str) -> tuple[int, float | str]:
    try:
        return (0, float(key))
    except ValueError:
        return (1, key)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

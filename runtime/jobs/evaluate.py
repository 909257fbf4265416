r"""Job ``evaluate`` (``eval_before``, ``eval_after``): held-out accuracy of a policy.

The policy is the job's single ``hf_checkpoint`` input; the prompts are
the eval split (``runtime.prompts.eval_file``). Every prompt gets ``spec.eval.samples`` answers from the
engine of ``rollout.engine`` (``open_engine``: the vLLM replicas the launch script started on
every node of the job, or the embedded ``LocalEngine`` on the spec's device; a few batched
``generate`` calls) at ``spec.eval.temperature`` (0 → greedy), at most
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
the result does not depend on how the prompts are batched.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.jobs.common import JobContext, JobError, atomic_write_json, run_job

#: At most this many sequences (prompts × samples) per ``generate`` call.
MAX_SEQUENCES_PER_CALL = 4096
_CORRECT_TOL = 1e-9


@dataclass(frozen=True)
class Sample:
    """One sampled answer: its text, token count and finish reason."""

    text: str
    tokens: int
    finish_reason: str


def single_input(ctx: JobContext, kind: str) -> str:
    """The name of the job's single input of ``kind``; a JobError if there is not one."""
    names = [n for n, ref in ctx.inputs.items() if ref.kind == kind]
    if len(names) != 1:
        raise JobError(f"job {ctx.job} needs exactly one {kind} input, has "
                       f"{', '.join(names) or 'none'}")
    return names[0]


def single_output(ctx: JobContext) -> str:
    if len(ctx.outputs) != 1:
        raise JobError(f"job {ctx.job} needs exactly one output, has {', '.join(ctx.outputs)}")
    return next(iter(ctx.outputs))


def open_engine(ctx: JobContext, model_dir: Path, seed: int) -> Any:
    """The engine the spec's ``rollout.engine`` names: ``vllm`` — the replicas the job's
    launch script started (``runtime.rollout.remote``); ``local`` — a ``LocalEngine`` on the
    spec's device (``runtime.devices.job_device``), one torch thread, FP8-rounded weights
    under ``rollout.fp8`` (as the job's vLLM replicas serve with ``--quantization fp8``)."""
    if ctx.spec["rollout"]["engine"] == "vllm":
        from runtime.rollout.remote import RemoteEngine, engine_endpoints

        return RemoteEngine(model_dir, engine_endpoints(), startup_timeout_s=ctx.startup_timeout_s,
                            request_timeout_s=ctx.rollout_timeout_s)
    import torch

    from runtime.devices import job_device
    from runtime.rollout.engine import LocalEngine

    torch.set_num_threads(1)
    return LocalEngine(model_dir, device=job_device(ctx.spec), seed=seed,
                       fp8=ctx.model_spec.rollout.fp8)


def sample_texts(engine: Any, prompts: Sequence[str], *, n: int, max_tokens: int,
                 temperature: float, seed: int, top_p: float = 1.0,
                 top_k: int = -1) -> list[list[Sample]]:
    """``n`` answers to every prompt (decoded without special tokens), in prompt order."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise JobError(f"the checkpoint {engine.model_dir} has no tokenizer")
    ids = [tokenizer.encode(str(p), add_special_tokens=False) for p in prompts]
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    per_call = max(1, MAX_SEQUENCES_PER_CALL // n)
    out: list[list[Sample]] = []
    for start in range(0, len(ids), per_call):
        results = engine.generate(ids[start:start + per_call], n=n, max_tokens=max_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=seed, stop_token_ids=eos)
        for res in results:
            out.append([Sample(engine.decode(s.token_ids), len(s.token_ids), s.finish_reason)
                        for s in res.samples])
    return out


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
    engine = open_engine(ctx, policy, seed)
    rows = drop_overlong(rows, engine.tokenizer, data, ctx.log, "eval")
    ctx.log.info("evaluating %s on %d prompts × %d sample(s), T=%g, max %d tokens",
                 policy, len(rows), n, temperature, max_tokens)
    answers = sample_texts(engine, [r[prompt_key] for r in rows.values()], n=n, max_tokens=max_tokens,
                           temperature=temperature, seed=seed)

    records: list[dict[str, Any]] = []
    by_diff: dict[str, list[int]] = defaultdict(list)
    for (i, row), group in zip(rows.items(), answers, strict=True):
        prompt, reference = str(row[prompt_key]), str(row[answer_key])
        for s in group:
            score = float(reward.score(prompt, s.text, reference))
            correct = score >= 1.0 - _CORRECT_TOL
            records.append({"prompt_id": row.get("id", i), "prompt": prompt,
                            "response": s.text, "answer": reference, "score": score,
                            "correct": correct, "tokens": s.tokens,
                            "finish_reason": s.finish_reason})
            if "difficulty" in row:
                by_diff[str(row["difficulty"])].append(int(correct))
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
    if ctx.rank != 0:
        return
    with ctx.atomic_output(out_name, accuracy=metrics["accuracy"]) as tmp:
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        atomic_write_json(tmp / "metrics.json", metrics)


def _num(key: str) -> tuple[int, float | str]:
    try:
        return (0, float(key))
    except ValueError:
        return (1, key)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

r"""Job ``screen``: stage 1 of the ZVE pipeline, the offline pass-rate screen before RL.

Parameters: the first ``offline_pass_rate`` item of ``spec.filters``. The proxy model is the
job's single ``hf_checkpoint`` input (the policy, or the external checkpoint named by
``proxy_model``). It samples ``k = samples_per_prompt`` answers to every prompt of
the train split (``runtime.prompts.train_file``) at the stage's ``temperature`` (at most ``spec.rollout.max_tokens``
tokens, stopping at eos; on the engine of ``rollout.engine``, ``evaluate.open_engine``; seeded
with ``spec.train.seed``); the verifier scores of the spec's ``reward`` section give
``p_i = mean_j score_ij``. The drop rule and the cost accounting are those of
``runtime.filters.OfflinePassRate`` (the RL driver's)::

    drop as too easy  if p_i ≥ max_pass_rate
    drop as hopeless  if min_pass_rate is not None and p_i ≤ min_pass_rate
    screening cost    = N · k · proxy_cost_ratio / reuse_epochs   (policy rollouts)

Prompt ids are the rows' ``id`` (the row index where a row has none).

Nodes: the stage's ``nodes`` is the job's size. On vLLM every node runs engine replicas and one
task spreads the prompts over all of them. On the embedded engine Slurm starts one task per
node (task rank
``SLURM_PROCID``). Task r samples the prompts r, r + nodes, r + 2·nodes, ... of the split
and writes their scores to ``artifacts/.<output>.shards-<SLURM_JOB_ID>/shard-<r>.json``
(with a fingerprint of what it screened); task 0 waits for every shard, merges them and
writes the output. Sample j of a prompt is seeded ``train.seed + j`` whatever its batch, so
the seeds do not depend on the number of nodes (vLLM's batch mix can still flip a near-tie). (The local scheduler starts one task:
``runtime.capabilities.screen_nodes`` refuses ``nodes > 1`` there.)

Output ``pass_rates`` (atomic): ``pass_rates.jsonl`` (``ScreenResult.write_jsonl``: a meta
line, then ``{prompt_id, pass_rate, kept}`` per prompt; read it back with
``ScreenResult.read_jsonl``) and ``summary.json`` ``{prompts, kept, dropped_too_easy,
dropped_hopeless, samples_per_prompt, screening_rollouts, screening_cost, params,
mean_pass_rate, proxy, seed, max_tokens, nodes}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtime.jobs.common import JobContext, JobError, atomic_write_json, run_job
from runtime.jobs.evaluate import open_engine, sample_texts, single_input, single_output

#: File name of the ScreenResult JSONL inside the output folder.
PASS_RATES_FILE = "pass_rates.jsonl"
_TOL = 1e-12  # OfflinePassRate's boundary tolerance
_POLL_S = 1.0  # how often task 0 looks for the other tasks' shards

Scores = list[list[float]]


def shard_dir(ctx: JobContext, out_name: str) -> Path:
    """Where the tasks of one screen job leave their shards (one folder per Slurm job)."""
    final = ctx.output_path(out_name)
    return final.parent / f".{final.name}.shards-{os.environ.get('SLURM_JOB_ID') or 'local'}"


def sharded_scores(ctx: JobContext, ids: Sequence[Any], k: int, nodes: int, rank: int,
                   fingerprint: str, score: Callable[[Sequence[Any], int], Scores],
                   out_name: str) -> Scores | None:
    """The scores of every prompt of ``ids`` (in order) on task 0, None on the others.

    Task ``rank`` of ``nodes`` scores ``ids[rank::nodes]``; the other tasks hand theirs over
    through files in :func:`shard_dir` (a shard with another fingerprint, left by an earlier
    attempt on other inputs, is not taken)."""
    mine = score(list(ids[rank::nodes]), k)
    if nodes == 1:
        return mine
    folder = shard_dir(ctx, out_name)
    if rank != 0:
        atomic_write_json(folder / f"shard-{rank}.json",
                          {"fingerprint": fingerprint, "rank": rank, "scores": mine})
        ctx.log.info("task %d of %d: wrote the scores of %d prompts for task 0",
                     rank, nodes, len(mine))
        return None
    shards: dict[int, Scores] = {0: mine}
    waiting_since = time.monotonic()
    while len(shards) < nodes:
        for r in range(1, nodes):
            path = folder / f"shard-{r}.json"
            if r in shards or not path.is_file():
                continue
            shard = json.loads(path.read_text(encoding="utf-8"))
            if shard.get("fingerprint") == fingerprint:
                shards[r] = shard["scores"]
        if len(shards) < nodes:
            if time.monotonic() - waiting_since > 60:
                ctx.log.info("waiting for the shards of tasks %s",
                             ", ".join(str(r) for r in range(nodes) if r not in shards))
                waiting_since = time.monotonic()
            time.sleep(_POLL_S)
    merged: Scores = [[] for _ in ids]
    for r, scores in shards.items():
        positions = range(r, len(ids), nodes)
        if len(scores) != len(positions):
            raise JobError(f"the shard of task {r} has {len(scores)} prompts, not "
                           f"{len(positions)}")
        for i, row in zip(positions, scores, strict=True):
            merged[i] = row
    shutil.rmtree(folder, ignore_errors=True)
    return merged


def screen_params(spec: dict[str, Any]) -> dict[str, Any]:
    """The first ``offline_pass_rate`` stage of ``spec.filters``, without its ``type``."""
    for stage in spec["filters"]:
        if stage["type"] == "offline_pass_rate":
            return {k: v for k, v in stage.items() if k != "type"}
    raise JobError("the spec has no offline_pass_rate stage in filters")


def run(ctx: JobContext) -> None:
    from runtime.files import read_jsonl
    from runtime.filters.offline_pass_rate import OfflinePassRate
    from runtime.prompts import drop_overlong, train_file
    from runtime.rewards import build_reward

    params = screen_params(ctx.spec)
    stage = OfflinePassRate(**params)
    data = ctx.section("data")
    prompt_key, answer_key = data["prompt_key"], data["answer_key"]
    max_tokens = int(ctx.section("rollout.max_tokens"))
    seed = ctx.model_spec.train.seed
    reward = build_reward(ctx.section("reward"))
    proxy = ctx.input_path(single_input(ctx, "hf_checkpoint"))
    out_name = single_output(ctx)

    rows = list(read_jsonl(train_file(ctx)))
    if not rows:
        raise JobError("the train split is empty")
    by_id = {row.get("id", i): row for i, row in enumerate(rows)}
    if len(by_id) != len(rows):
        raise JobError("the train split has duplicate prompt ids")
    engine = open_engine(ctx, proxy, seed)
    by_id = drop_overlong(by_id, engine.tokenizer, data, ctx.log, "train")
    # On vLLM one task spreads every prompt over the replicas of all the job's nodes.
    served = ctx.spec["rollout"]["engine"] == "vllm"
    nodes, rank = (1, 0) if served else (stage.nodes, ctx.rank)
    if not 0 <= rank < nodes:
        raise JobError(f"task rank {rank} outside the screen's {nodes} node(s)")
    ids = list(by_id)
    ctx.log.info("screening %d of %d prompts (task %d of %d) × %d samples with %s (T=%g, "
                 "max %d tokens)", len(ids[rank::nodes]), len(ids), rank, nodes,
                 stage.samples_per_prompt, proxy, stage.temperature, max_tokens)

    def score(prompt_ids: Sequence[Any], k: int) -> Scores:
        chosen = [by_id[p] for p in prompt_ids]
        answers = sample_texts(engine, [r[prompt_key] for r in chosen], n=k,
                               max_tokens=max_tokens, temperature=stage.temperature, seed=seed)
        return [[float(reward.score(str(r[prompt_key]), s.text, str(r[answer_key])))
                 for s in group] for r, group in zip(chosen, answers, strict=True)]

    fingerprint = hashlib.sha256(json.dumps(
        [[str(p) for p in ids], str(proxy), stage.params(), seed, max_tokens, nodes],
        sort_keys=True).encode()).hexdigest()
    scores = sharded_scores(ctx, ids, stage.samples_per_prompt, nodes, rank, fingerprint,
                            score, out_name)
    if scores is None:  # another task merges and writes
        return
    result = stage.run(ids, lambda prompt_ids, k: scores)
    rates = result.pass_rates
    too_easy = int((rates >= stage.max_pass_rate - _TOL).sum())
    hopeless = (0 if stage.min_pass_rate is None
                else int((rates <= stage.min_pass_rate + _TOL).sum()))
    summary = {
        "prompts": len(result.prompt_ids),
        "kept": int(result.kept.sum()),
        "dropped": int((~result.kept).sum()),
        "dropped_too_easy": too_easy,
        "dropped_hopeless": hopeless,
        "samples_per_prompt": result.samples_per_prompt,
        "screening_rollouts": result.samples,
        "screening_cost": result.cost,
        "mean_pass_rate": float(rates.mean()) if len(rates) else 0.0,
        "params": stage.params(),
        "proxy": str(proxy),
        "seed": seed,
        "max_tokens": max_tokens,
        "nodes": nodes,
        "file": PASS_RATES_FILE,
    }
    ctx.log.info("kept %d of %d prompts (too easy %d, hopeless %d); %d rollouts, cost %.1f",
                 summary["kept"], summary["prompts"], too_easy, hopeless,
                 result.samples, result.cost)
    with ctx.atomic_output(out_name, kept=summary["kept"], prompts=summary["prompts"]) as tmp:
        result.write_jsonl(tmp / PASS_RATES_FILE)
        atomic_write_json(tmp / "summary.json", summary)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

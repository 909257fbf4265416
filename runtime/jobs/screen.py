r"""Job ``screen``: stage 1 of the ZVE pipeline, the offline pass-rate screen before RL.

Parameters: the first ``offline_pass_rate`` item of ``spec.filters``. The proxy model is the
job's single ``hf_checkpoint`` input (the policy, or the external checkpoint named by
``proxy_model``). It samples ``k = samples_per_prompt`` answers to every prompt of
the train split (``runtime.prompts.train_file``) at the stage's ``temperature`` (at most ``spec.rollout.max_tokens``
tokens, stopping at eos; on the engine of ``rollout.engine``, ``sampled.open_engine``; seeded
with ``spec.train.seed``); the verifier scores of the spec's ``reward`` section give
``p_i = mean_j score_ij``. The drop rule and the cost accounting are those of
``runtime.filters.OfflinePassRate`` (the RL driver's)::

    drop as too easy  if p_i ≥ max_pass_rate
    drop as hopeless  if min_pass_rate is not None and p_i ≤ min_pass_rate
    screening cost    = N · k · proxy_cost_ratio / reuse_epochs   (policy rollouts)

Prompt ids are the rows' ``id`` (the row index where a row has none).

Nodes: the stage's ``nodes`` is the job's size. On vLLM every node runs engine replicas and one
task spreads the prompts over all of them; on the embedded engine Slurm starts one task per
node and task r screens the prompts r, r + nodes, ... (``runtime.jobs.sampled.split_over_nodes``;
the local scheduler starts one task: ``runtime.capabilities.screen_nodes`` refuses
``nodes > 1`` there). Sample j of a prompt is seeded ``train.seed + j`` whatever its batch, so
the scores do not depend on the number of nodes (vLLM's batch mix can still flip a near-tie).

Resuming: each task saves its prompts' scores batch by batch
(``runtime.jobs.sampled.sample_resumably``); a screen killed, preempted or timed out, run
again on the same proxy, prompts and parameters, samples only the prompts it had not finished.

Output ``pass_rates`` (atomic): ``pass_rates.jsonl`` (``ScreenResult.write_jsonl``: a meta
line, then ``{prompt_id, pass_rate, kept}`` per prompt; read it back with
``ScreenResult.read_jsonl``) and ``summary.json`` ``{prompts, kept, dropped_too_easy,
dropped_hopeless, samples_per_prompt, screening_rollouts, screening_cost, params,
mean_pass_rate, proxy, seed, max_tokens, nodes}``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from runtime.jobs.common import (
    JobContext,
    JobError,
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

#: File name of the ScreenResult JSONL inside the output folder.
PASS_RATES_FILE = "pass_rates.jsonl"
_TOL = 1e-12  # OfflinePassRate's boundary tolerance


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
    nodes = 1 if ctx.spec["rollout"]["engine"] == "vllm" else stage.nodes
    ids = list(by_id)
    keyed = {str(p): by_id[p] for p in ids}
    if len(keyed) != len(ids):
        raise JobError("the train split has prompt ids that differ only in type (1 and '1')")
    k = stage.samples_per_prompt
    ctx.log.info("screening %d prompts over %d task(s) × %d samples with %s (T=%g, max %d "
                 "tokens)", len(ids), nodes, k, proxy, stage.temperature, max_tokens)
    work = fingerprint(ctx, keyed, stage.params(), seed, max_tokens, nodes,
                       checkpoints=[proxy])

    def scores_of(key: str, answers: list[Sample]) -> list[float]:
        row = keyed[key]
        return [float(reward.score(str(row[prompt_key]), a.text, str(row[answer_key])))
                for a in answers]

    def screen(keys: list[str]) -> dict[str, Any]:
        return sample_resumably(ctx, engine, {key: str(keyed[key][prompt_key]) for key in keys},
                                progress_for(ctx, out_name, work), scores_of, n=k,
                                max_tokens=max_tokens, temperature=stage.temperature, seed=seed)

    by_key = split_over_nodes(ctx, list(keyed), nodes, work, screen, out_name)
    if by_key is None:  # another task merges and writes
        return
    scores = [by_key[str(p)] for p in ids]
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
    forget_progress(ctx, out_name)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

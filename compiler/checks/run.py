"""Run-level checks: batch and sequence sizes of a step, cluster settings, the filters' ZVE
budgets, and fields of one section that name or presuppose another's."""

from __future__ import annotations

import math
from collections.abc import Iterator

from compiler.checks._common import (
    GBS,
    MAX_POS,
    MAX_TOKENS,
    PROMPT_TOKENS,
    R_NODES,
    TRAIN_NODES,
    Path,
    _error,
    _multiples_near,
    _or,
    _warning,
)
from compiler.plan import Plan
from spec.errors import Problem
from spec.models import AdaptiveGroupSize, FlatGroups, RewardShaping, Spec

# --------------------------------------------------------------------------- run-level


def run_level(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """prompts_per_step × n is a whole multiple of global_batch_size (optimizer steps per
    rollout batch are derived); prompt + response (rollout and eval) fit the positions; a
    run can learn (groups of more than one response for group advantages, a warm-up shorter
    than the run)."""
    rollouts, gbs = plan.rollouts_per_step, spec.train.global_batch_size
    r = spec.rollout
    if r.n == 1 and spec.algorithm.advantage.estimator == "group":
        adaptive = any(isinstance(s, AdaptiveGroupSize) for s in spec.filters)
        message = ("n is 1: a group of one response has zero variance, so its group-relative "
                   "advantage is 0" + (" wherever adaptive_group_size keeps the base size"
                                       if adaptive else ", for every prompt: RL learns nothing"))
        problem = _warning if adaptive else _error
        yield problem(("rollout", "n"), message, "set rollout.n: 8 (any n ≥ 2)",
                      (("algorithm", "advantage", "estimator"),))
    optimizer_steps = plan.optimizer_steps_per_rollout * spec.train.steps
    warmup = spec.train.optimizer.warmup_steps
    if warmup >= optimizer_steps:
        yield _warning(("train", "optimizer", "warmup_steps"),
                       f"warmup_steps {warmup} ≥ the run's {optimizer_steps} optimizer steps "
                       f"({plan.optimizer_steps_per_rollout} per RL step × train.steps "
                       f"{spec.train.steps}): the learning rate never reaches lr",
                       f"set train.optimizer.warmup_steps below {optimizer_steps}",
                       (("train", "steps"),))
    if rollouts % gbs:
        # q·n is a multiple of gbs exactly when q is a multiple of gbs / gcd(n, gbs).
        prompts = _multiples_near(r.prompts_per_step, gbs // math.gcd(r.n, gbs))
        yield _error(
            ("rollout", "prompts_per_step"),
            f"prompts_per_step × n = {r.prompts_per_step} × {r.n} = {rollouts} rollouts is not a "
            f"whole multiple of global_batch_size {gbs}",
            f"set rollout.prompts_per_step: {_or(prompts)}, or a global_batch_size dividing "
            f"{rollouts}",
            (("rollout", "n"), GBS),
        )
    max_pos = spec.model.architecture.max_position_embeddings
    prompt = spec.data.max_prompt_tokens
    if plan.seq_len > max_pos:
        yield _error(MAX_TOKENS,
                     f"max_prompt_tokens {prompt} + max_tokens {r.max_tokens} = {plan.seq_len} "
                     f"exceeds max_position_embeddings {max_pos}",
                     f"set rollout.max_tokens: {max(1, max_pos - prompt)} or less",
                     (PROMPT_TOKENS, MAX_POS))
    ev = spec.eval
    if ev.enabled and ev.max_tokens is not None and prompt + ev.max_tokens > max_pos:
        yield _error(("eval", "max_tokens"),
                     f"max_prompt_tokens {prompt} + eval max_tokens {ev.max_tokens} = "
                     f"{prompt + ev.max_tokens} exceeds max_position_embeddings {max_pos}",
                     f"set eval.max_tokens: {max(1, max_pos - prompt)} or less",
                     (PROMPT_TOKENS, MAX_POS))


def cluster_settings(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Slurm without a partition relies on the site default (warning); Slurm's resource
    requests set on a local spec do nothing there (warning); weight_sync ipc needs
    trainer and engines on one machine, which separate Slurm nodes are not (error; colocated
    engines share the trainer's nodes); on Slurm the driver and its ``reward_workers`` run
    in the RL job's task on the batch host, ``cpus_per_task`` × its ranks CPUs shared with
    that node's engines or trainer ranks: more workers than CPUs only time-slice (warning)."""
    c = spec.cluster
    if c.scheduler == "slurm" and not c.partition:
        yield _warning(("cluster", "partition"), "scheduler slurm without a partition: jobs go "
                                                 "to the cluster's default partition",
                       "set cluster.partition", (("cluster", "scheduler"),))
    if c.scheduler == "local":
        # Slurm requests a local run cannot honour: said, not silently ignored.
        for name, flag in (("cpus_per_task", "--cpus-per-task"), ("exclusive", "--exclusive"),
                           ("mem_gb", "--mem")):
            if name in c.model_fields_set:
                yield _warning(("cluster", name), f"cluster.{name} is a Slurm request ({flag}); "
                                                  "a local run neither reserves nor limits it",
                               "remove it, or set cluster.scheduler: slurm",
                               (("cluster", "scheduler"),))
    workers, cpus = spec.system.reward_workers, c.cpus_per_task * c.gpus_per_node
    if c.scheduler == "slurm" and workers + 1 > cpus:
        yield _warning(("system", "reward_workers"),
                       f"reward_workers {workers} and the driver need {workers + 1} CPUs, but "
                       f"the RL job's task on the batch host has {cpus} (cpus_per_task "
                       f"{c.cpus_per_task} × {c.gpus_per_node} ranks), shared with that node's "
                       "engines or trainer ranks",
                       f"set system.reward_workers: {max(1, cpus - 1)} or fewer, or raise "
                       "cluster.cpus_per_task",
                       (("cluster", "cpus_per_task"), ("cluster", "gpus_per_node")))
    if (c.scheduler == "slurm" and spec.system.weight_sync == "ipc"
            and spec.rollout.placement != "colocated"):
        yield _error(("system", "weight_sync"),
                     f"weight_sync ipc shares memory inside one machine, but the trainer "
                     f"({spec.train.nodes} node(s)) and the rollout engines ({spec.rollout.nodes} "
                     "node(s)) run on separate Slurm nodes",
                     "set system.weight_sync: disk, or rollout.placement: colocated",
                     (TRAIN_NODES, R_NODES))


# --------------------------------------------------------------------------- ZVE budgets


def zve_budgets(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """A stage whose worst case cannot fill a batch needs a declared fallback (flat_groups
    drop: every group may be flat, however many refills); settings a stage ignores, a
    reward_shaping stage that does nothing, and an adaptive stage that cannot grow are warnings."""
    base = plan.rollouts_per_step
    for i, st in enumerate(spec.filters):
        path: Path = ("filters", i)
        if isinstance(st, FlatGroups):
            budget = next((b for b in plan.stage_budgets if b.index == i), None)
            if st.action == "drop" and st.fallback is None:
                worst = budget.worst_case_rollouts_per_step if budget else 0.0
                yield _error(
                    (*path, "fallback"),
                    f"flat_groups drop samples at most {1 + st.max_refills} round(s) of "
                    f"oversample {st.oversample:g} × {spec.rollout.prompts_per_step} prompts "
                    f"({base + worst:g} rollouts per step, {worst:g} beyond the {base}), and the "
                    "batch still comes up short when every group is flat",
                    f"set filters[{i}].fallback: keep, rl_zvp, shrink or error",
                    ((*path, "oversample"), (*path, "max_refills")),
                )
            if st.action != "drop":
                ignored = sorted({"oversample", "max_refills", "fallback"} & st.model_fields_set)
                if ignored:
                    yield _warning((*path, ignored[0]),
                                   f"{', '.join(ignored)} only apply to action drop; this stage's "
                                   f"action is {st.action}",
                                   f"remove {', '.join(ignored)} from filters[{i}]",
                                   ((*path, "action"),))
        elif isinstance(st, RewardShaping):
            if st.length.coefficient == 0 and st.repetition.coefficient == 0:
                yield _warning(path, "reward_shaping with length and repetition coefficients 0 "
                                     "changes no reward",
                               f"set filters[{i}].length.coefficient (e.g. 0.05) or remove the stage",
                               ((*path, "length", "coefficient"),
                                (*path, "repetition", "coefficient")))
        elif isinstance(st, AdaptiveGroupSize) and st.max_n <= spec.rollout.n:
            yield _warning((*path, "max_n"), f"adaptive_group_size max_n {st.max_n} is not above "
                                             f"rollout.n {spec.rollout.n}: no group can grow",
                           f"set filters[{i}].max_n above {spec.rollout.n}", (("rollout", "n"),))


# --------------------------------------------------------------------------- references


def _rl_zvp_stage(spec: Spec) -> int | None:
    """Index of a flat_groups stage that reshapes flat groups with RL-ZVP (action or fallback)."""
    for i, st in enumerate(spec.filters):
        if isinstance(st, FlatGroups) and (st.action == "rl_zvp" or st.fallback == "rl_zvp"):
            return i
    return None


# The judge fields each `reward.judge.type` reads; the other type's are warned about.
JUDGE_FIELDS = {"rule": ("tie_margin",), "http": ("url", "model", "api_key_env", "timeout_s")}


def references(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Fields of one section that name or presuppose another's. Parameters of a loss or a
    judge type that is not selected are warnings (they would be ignored)."""
    est = ("algorithm", "advantage", "estimator")
    zvp = _rl_zvp_stage(spec)
    flat = next((i for i, s in enumerate(spec.filters) if isinstance(s, FlatGroups)), None)
    if spec.algorithm.advantage.estimator == "rl_zvp" and zvp is None:
        where = f"filters[{flat}].action: rl_zvp" if flat is not None else \
            "a filters stage {type: flat_groups, action: rl_zvp}"
        yield _error(est, "advantage estimator rl_zvp, but no flat_groups stage reshapes flat "
                          "groups with rl_zvp",
                     f"add {where}, or set algorithm.advantage.estimator: group",
                     (("filters", flat) if flat is not None else ("filters",),))
    if zvp is not None and spec.algorithm.advantage.estimator != "rl_zvp":
        st = spec.filters[zvp]
        field = "action" if isinstance(st, FlatGroups) and st.action == "rl_zvp" else "fallback"
        yield _error(est, f"filters[{zvp}].{field} is rl_zvp, but the advantage estimator is "
                          f"{spec.algorithm.advantage.estimator}",
                     "set algorithm.advantage.estimator: rl_zvp", (("filters", zvp, field),))

    judge = spec.reward.judge
    if judge is not None and judge.type == "http" and judge.api_key_env and \
            judge.api_key_env not in spec.cluster.env_passthrough:
        yield _error(("reward", "judge", "api_key_env"),
                     f"the judge reads its key from {judge.api_key_env}, which is not in "
                     f"cluster.env_passthrough ({', '.join(spec.cluster.env_passthrough) or 'empty'}): "
                     "the jobs would not see it",
                     f"add {judge.api_key_env} to cluster.env_passthrough",
                     (("cluster", "env_passthrough"),))

    if judge is not None:  # a field only the other judge type reads (runtime.rewards.composer)
        other = "http" if judge.type == "rule" else "rule"
        kind = {"rule": "a rule judge", "http": "an http judge"}
        for name in [f for f in JUDGE_FIELDS[other] if f in judge.model_fields_set]:
            yield _warning(("reward", "judge", name),
                           f"reward.judge.{name} is set but the judge type is {judge.type}: it has "
                           f"no effect for {kind[judge.type]} (only {kind[other]} reads it)",
                           f"remove reward.judge.{name}, or set reward.judge.type: {other}",
                           (("reward", "judge", "type"),))

    chosen = spec.algorithm.loss
    for name in sorted({"espo", "gspo", "grpo", "cispo"} & spec.algorithm.model_fields_set - {chosen}):
        yield _warning(("algorithm", name), f"algorithm.{name} is set but the loss is {chosen}: "
                                            "its parameters are not used",
                       f"remove algorithm.{name}, or set algorithm.loss: {name}",
                       (("algorithm", "loss"),))

    if spec.model.checkpoint_format == "megatron" and spec.train.backend == "local":
        yield _error(("model", "checkpoint_format"), "a megatron checkpoint cannot be read by the "
                                                     "local trainer (it reads HF checkpoints)",
                     "set train.backend: megatron, or give an HF checkpoint",
                     (("train", "backend"),))
    if spec.model.checkpoint_format == "megatron" and spec.model.checkpoint and \
            not spec.model.tokenizer:
        yield _error(("model", "tokenizer"), "a Megatron checkpoint carries no tokenizer, and "
                                             "the rollout engines' HF copy (job to_hf) needs one",
                     "set model.tokenizer to the tokenizer's folder",
                     (("model", "checkpoint_format"),))

    d = spec.data
    if d.generator is None and d.eval is None and (spec.eval.enabled or spec.eval.every_steps):
        # An eval job (or the in-run eval) with no prompts cannot start: an error, not a warning.
        what = "eval is enabled" if spec.eval.enabled else \
            f"eval.every_steps is {spec.eval.every_steps}"
        yield _error(("eval", "enabled") if spec.eval.enabled else ("eval", "every_steps"),
                     f"{what} but data.eval is not set: there are no held-out prompts",
                     "set data.eval to a JSONL file of held-out prompts, or eval.enabled: false "
                     "and eval.every_steps: 0",
                     (("data", "eval"), ("data", "train")))

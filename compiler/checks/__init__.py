"""Cross-section checks of a spec against its Plan (DESIGN.md §3), before anything runs.

`check(spec, plan)` returns every problem at once: errors (the run cannot start, or would
silently do something else than written) and warnings (legal but probably not meant; shown
by `validate` and `inspect`). Each rule is a small function of (spec, plan) that names the
fields involved (`path` + `related`), the conflicting numbers, and a value that would fix it.

Rules are grouped by concern, in the order a person would fix them: training grid, expert
grid, attention/TP, Qwen3 head_dim, pipeline, sequence parallel, context parallel, batch
arithmetic, rollout, run-level, ZVE budgets, references between sections, settings the
selected path does not read, memory.

The rules live in one module per group, each importing only `_common` (the Problem
constructors, the spec paths, small helpers): `training` (training and expert grids,
attention / TP, head_dim, pipeline, sequence and context parallel, batch arithmetic),
`rollout` (rollout grid, redundant experts, FP8, staleness, colocated placement), `run`
(run-level, cluster settings, ZVE budgets, references), `settings` (unused settings) and
`memory`. This module holds the entry points, `RULES` (the order problems are reported in),
`check` and `checked_plan`, and every rule by name (``compiler.docs`` and the field-effect
table look rules up here).

What a job of the bundle would refuse at start (the embedded trainer on GPUs, a layout the
Megatron trainer does not run, router replay on a dense model, …) is declared by the runtime
(`runtime.capabilities`) and checked by `compiler.api` through every job's preflight, not here.

Decisions where DESIGN.md §3 leaves room (see each rule's docstring):
- Memory over capacity is an error only when weights + grads + activations alone are over;
  when only the optimizer state pushes it over, it is a warning, because production recipes
  (slime's Qwen3-235B, GLM-4.5, DeepSeek-R1) offload the optimizer to the CPU.
- An rl_zvp `fallback` of a drop stage counts as "a flat_groups stage whose action is rl_zvp"
  for the advantage-estimator agreement: both need the rl_zvp estimator.
"""

from __future__ import annotations

from dataclasses import replace

from compiler.checks._common import HEAD_DIM, Rule
from compiler.checks.memory import memory
from compiler.checks.rollout import (
    colocated_placement,
    fp8_rollout,
    redundant_experts,
    rollout_grid,
    stale_rollouts,
)
from compiler.checks.run import (
    cluster_settings,
    references,
    run_level,
    zve_budgets,
)
from compiler.checks.settings import unused_settings
from compiler.checks.training import (
    attention_tp,
    batch_arithmetic,
    checkpoint_head_dim,
    context_parallel,
    expert_grid,
    expert_sizes,
    interleaved_schedule,
    pipeline,
    sequence_parallel,
    training_grid,
)
from compiler.plan import Plan, make_plan
from spec.errors import Problem, SpecError
from spec.models import Spec

__all__ = [
    "HEAD_DIM",  # the field compiler.api points a checkpoint's head_dim mismatch at
    "RULES",
    "attention_tp",
    "batch_arithmetic",
    "check",
    "checked_plan",
    "checkpoint_head_dim",
    "cluster_settings",
    "colocated_placement",
    "context_parallel",
    "expert_grid",
    "expert_sizes",
    "fp8_rollout",
    "interleaved_schedule",
    "memory",
    "pipeline",
    "redundant_experts",
    "references",
    "rollout_grid",
    "run_level",
    "sequence_parallel",
    "stale_rollouts",
    "training_grid",
    "unused_settings",
    "zve_budgets",
]


# --------------------------------------------------------------------------- entry points


RULES: tuple[Rule, ...] = (
    training_grid,
    expert_grid,
    expert_sizes,
    attention_tp,
    checkpoint_head_dim,
    pipeline,
    sequence_parallel,
    context_parallel,
    batch_arithmetic,
    interleaved_schedule,
    rollout_grid,
    redundant_experts,
    fp8_rollout,
    stale_rollouts,
    colocated_placement,
    run_level,
    cluster_settings,
    zve_budgets,
    references,
    unused_settings,
    memory,
)


def check(spec: Spec, plan: Plan) -> list[Problem]:
    """Every problem of DESIGN.md §3 and the cross-section rules, errors and warnings."""
    problems: list[Problem] = []
    for rule in RULES:
        problems.extend(rule(spec, plan))
    return problems


def checked_plan(spec: Spec) -> Plan:
    """make_plan + check: SpecError with every error, else the plan with its warnings."""
    plan = make_plan(spec)
    problems = check(spec, plan)
    if any(p.severity == "error" for p in problems):
        raise SpecError(problems)
    return replace(plan, warnings=tuple(problems))

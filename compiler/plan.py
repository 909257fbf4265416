"""The Plan: every value derived from a spec, computed once, here.

`make_plan(spec)` is the single place that turns a valid-shaped `Spec` into sizes,
budgets and estimates. Checks (`compiler.checks`) judge a plan; graph building, rendering
and `rlspec inspect` read it. Nothing else recomputes a derived value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from compiler import estimates
from compiler.estimates import MemoryEstimate, ParamCount
from runtime.capabilities import MEGATRON_FAMILIES, TRAINER_ATTENTION
from spec.errors import Problem
from spec.models import AdaptiveGroupSize, FlatGroups, OfflinePassRate, Spec
from spec.partial import Invalid, InvalidValueUsed


@dataclass(frozen=True)
class StageBudget:
    """Rollout budget of one zero-variance-elimination stage, per RL step unless noted."""

    index: int  # position in spec.filters
    type: str
    rollouts_per_step: float  # policy-equivalent rollouts this stage adds per step (expected)
    worst_case_rollouts_per_step: float
    can_fill_batch_worst_case: bool
    one_time_rollouts: float = 0.0  # offline screening (proxy-cost weighted, amortised)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Derived sizes of one run. Field names are shown verbatim by `rlspec inspect --json`."""

    # trainer (Megatron-core)
    train_world_size: int  # W = train.nodes × gpus_per_node (Megatron); 1 (the embedded trainer)
    data_parallel: int  # DP = W / (TP·PP·CP)
    expert_tensor_parallel: int  # ETP, resolved (unset → TP)
    expert_tensor_defaulted: bool  # ETP came from Megatron's default (= TP)
    expert_data_parallel: int  # W / (ETP·EP·PP)
    pipeline_layers: tuple[int, ...]  # layers per pipeline stage
    micro_batches_per_step: int  # global_batch / (micro_batch · DP)
    # rollout (vLLM)
    rollout_world_size: int  # R = rollout.nodes × gpus_per_node
    gpus_per_replica: int  # TP·DP of one engine
    rollout_replicas: int  # R / gpus_per_replica
    rollout_expert_parallel: int | None  # TP·DP when expert_parallel, else None
    # run
    rl_nodes: int  # nodes of the RL allocation (trainer + rollout; the trainer's when colocated)
    seq_len: int  # max prompt tokens + max response tokens
    rollouts_per_step: int  # prompts_per_step × n, before filters
    optimizer_steps_per_rollout: int  # (rollouts_per_step / global_batch) × ppo_epochs
    stage_budgets: tuple[StageBudget, ...]
    expected_rollouts_per_step: float  # with every stage's additions
    params: ParamCount
    train_memory: MemoryEstimate
    rollout_memory: MemoryEstimate
    routing_dtype: str | None  # storage dtype of replayed expert ids (uint8 / int16)
    routing_bytes_per_token: int  # moe_layers × top_k × itemsize; 0 without replay
    warnings: tuple[Problem, ...] = field(default_factory=tuple)

    # Added by make_plan (not in the first draft of this class): full-length sequences the
    # KV cache of one rollout engine replica holds (0: not even one; -1: cpu run, not estimated).
    rollout_max_sequences: int = 0
    # How engine replicas sit on rollout nodes: a replica fits in a node (several per node)
    # or spans whole nodes (vLLM data parallelism across nodes, one replica per node group).
    replicas_per_node: int = 1
    nodes_per_replica: int = 1
    eval_seq_len: int = 0  # max prompt tokens + eval max tokens (the eval engines' max length)

    @property
    def is_moe(self) -> bool:
        return self.params.moe_layers > 0

    def to_dict(self) -> dict:
        """JSON-ready view (warnings as formatted text), for `inspect --json` and job configs."""
        out = asdict(self)
        out["warnings"] = [w.format() for w in self.warnings]
        return out


# --------------------------------------------------------------------------- make_plan


def _div(a: int, b: int) -> int:
    """a // b, 0 when b is 0: the plan stays total; checks report what does not divide."""
    return a // b if b > 0 else 0


def pipeline_split(
    num_layers: int, pp: int, first: int | None, last: int | None
) -> tuple[int, ...]:
    """Layers per pipeline stage (always PP entries, never raises).

    Even split: num_layers // PP each. With Megatron's uneven first/last stages
    (`--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers`) the
    remaining layers go evenly to the PP − 2 middle stages (PP − 1 when only one end is given).
    Integer division throughout; `compiler.checks` reports a split that does not add up.
    """
    pp = max(1, pp)
    if pp == 1:
        return (num_layers,)
    if first is None and last is None:
        return (num_layers // pp,) * pp
    given = (first is not None) + (last is not None)
    middle = pp - given
    remaining = max(0, num_layers - (first or 0) - (last or 0))
    each = _div(remaining, middle)
    head = (first,) if first is not None else ()
    tail = (last,) if last is not None else ()
    return (*head, *(each,) * middle, *tail)


def routing_storage(spec: Spec, moe_layers: int) -> tuple[str | None, int]:
    """(dtype, bytes per token) of replayed expert ids: uint8 for ≤ 256 experts, else int16."""
    moe = spec.model.architecture.moe
    if spec.router_replay.mode == "off" or moe is None or moe_layers == 0:
        return None, 0
    dtype, size = ("uint8", 1) if moe.num_experts <= 256 else ("int16", 2)
    return dtype, moe_layers * moe.top_k * size


def stage_budgets(spec: Spec) -> tuple[StageBudget, ...]:
    """Rollout budget of each ZVE stage, in policy-equivalent rollouts per RL step.

    base = prompts_per_step · n rollouts per step. Per stage:
    - offline_pass_rate: one-time screen of N train prompts · k samples · proxy_cost_ratio,
      amortised over reuse_epochs (`one_time_rollouts`), spread over train.steps per step.
      N is the generator's train_size; a JSONL file's size is unknown here (noted, counted 0).
    - adaptive_group_size: grown groups add at most min(budget − 1, max_n/n − 1) · base;
      the expected figure is shown at that cap (it depends on the share of extreme prompts).
    - reward_shaping, history, flat_groups keep / rl_zvp: add nothing.
    - flat_groups drop: sample oversample · prompts per round, 1 + max_refills rounds at most:
      expected (oversample − 1) · base extra, worst (oversample·(1 + max_refills) − 1) · base.
      When every group is flat no number of refills fills the batch: only a fallback that
      trains on the flat groups (keep, rl_zvp) fills it; shrink and error are declared but do not.
    """
    r = spec.rollout
    base = float(r.prompts_per_step * r.n)
    out: list[StageBudget] = []
    for i, st in enumerate(spec.filters):
        if isinstance(st, OfflinePassRate):
            gen = spec.data.generator
            notes: tuple[str, ...] = ()
            if gen is not None:
                one_time = gen.train_size * st.samples_per_prompt * st.proxy_cost_ratio / st.reuse_epochs
            else:
                one_time = 0.0
                notes = ("train prompts come from a file whose size is unknown at compile time: "
                         "screening costs N·k·proxy_cost_ratio/reuse_epochs rollouts, "
                         f"N = prompts in {spec.data.train}",)
            per_step = one_time / spec.train.steps
            out.append(StageBudget(i, st.type, per_step, per_step, True, one_time, notes))
        elif isinstance(st, AdaptiveGroupSize):
            grow = max(0.0, min(st.budget - 1.0, st.max_n / r.n - 1.0)) * base
            note = ("expected growth depends on the share of prompts with extreme pass rates; "
                    "shown at its cap")
            out.append(StageBudget(i, st.type, grow, grow, True, notes=(note,)))
        elif isinstance(st, FlatGroups) and st.action == "drop":
            expected = (st.oversample - 1.0) * base
            worst = (st.oversample * (1 + st.max_refills) - 1.0) * base
            fills = st.fallback in ("keep", "rl_zvp")
            note = (f"worst case: {1 + st.max_refills} round(s) of {st.oversample:g} × "
                    f"{r.prompts_per_step} prompts, every group flat; fallback: {st.fallback}")
            out.append(StageBudget(i, st.type, expected, worst, fills, notes=(note,)))
        else:
            out.append(StageBudget(i, st.type, 0.0, 0.0, True))
    return tuple(out)


def _step(compute: Callable[[], Any]) -> Any:
    """compute(), or an `Invalid` stand-in when it needs a value of a partial spec that did
    not validate (spec.partial): the plan of a valid spec never sees one."""
    try:
        return compute()
    except InvalidValueUsed as exc:
        return Invalid(exc.args[0] if exc.args else ())


def make_plan(spec: Spec) -> Plan:
    """Every derived value of a shape-valid spec. Total: never raises, whatever the numbers.

    Sizes use integer division (0 when a divisor is 0); `compiler.checks.check` judges them.
    See `compiler.estimates` for the parameter and memory formulas. Of a partial spec (one that
    did not validate, `spec.partial`) each value that needs an invalid one is itself `Invalid`,
    so a check that reads it is skipped while the others run.
    """
    arch = spec.model.architecture
    gpn = spec.cluster.gpus_per_node
    p = spec.train.parallelism
    tp, pp, cp, ep = p.tensor, p.pipeline, p.context, p.expert
    etp = _step(lambda: p.expert_tensor if p.expert_tensor is not None else tp)

    # The embedded trainer is one process on one device, whatever the node has (DP = 1).
    world = _step(lambda: 1 if spec.train.backend == "local" else spec.train.nodes * gpn)
    dp = _step(lambda: _div(world, tp * pp * cp))
    expert_dp = _step(lambda: _div(world, etp * ep * pp))
    layers = _step(lambda: pipeline_split(arch.num_layers, pp, p.first_pipeline_stage_layers,
                                          p.last_pipeline_stage_layers))
    micro_batches = _step(
        lambda: _div(spec.train.global_batch_size, spec.train.micro_batch_size * dp))

    rp = spec.rollout.parallelism
    rollout_world = _step(lambda: spec.rollout.nodes * gpn)
    per_replica = _step(lambda: rp.tensor * rp.data)
    replicas = _step(lambda: _div(rollout_world, per_replica))

    seq_len = _step(lambda: spec.data.max_prompt_tokens + spec.rollout.max_tokens)
    rollouts = _step(lambda: spec.rollout.prompts_per_step * spec.rollout.n)
    opt_steps = _step(
        lambda: _div(rollouts, spec.train.global_batch_size) * spec.algorithm.ppo_epochs)
    budgets = _step(lambda: stage_budgets(spec))

    params = _step(lambda: estimates.count_params(arch))
    routing = _step(lambda: routing_storage(spec, params.moe_layers))
    routing_dtype, routing_bytes = (routing if isinstance(routing, tuple)
                                    else (routing, routing))

    def memory() -> tuple[MemoryEstimate, MemoryEstimate, int]:
        if spec.cluster.devices == "cpu":
            skipped = ("cpu run: not estimated",)
            return (MemoryEstimate({}, 0.0, spec.cluster.gpu_memory_gb, skipped),
                    MemoryEstimate({}, 0.0, spec.cluster.gpu_memory_gb, skipped), -1)
        layout = estimates.TrainLayout(
            tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, dp=dp, expert_dp=expert_dp,
            vpp=p.virtual_pipeline or 1, sequence_parallel=p.sequence_parallel and tp > 1,
            pipeline_layers=layers, micro_batches=micro_batches,
            micro_batch_size=spec.train.micro_batch_size, seq_len=seq_len,
            precision=spec.train.precision, recompute=spec.train.recompute,
            distributed_optimizer=spec.train.optimizer.distributed,
            # A family the Megatron trainer does not build is refused at start
            # (runtime.capabilities.megatron_model): estimated as Megatron-LM runs it.
            attention=(TRAINER_ATTENTION.get(spec.train.backend, "flash")
                       if arch.family in MEGATRON_FAMILIES else "flash"),
            heads=arch.num_attention_heads,
            optimizer_offload=(spec.train.optimizer.offload_fraction
                               if spec.train.optimizer.cpu_offload else 0.0),
        )
        train = estimates.train_memory(arch, layout, spec.cluster.gpu_memory_gb)
        rollout, sequences = estimates.rollout_memory(
            arch, params, tp=rp.tensor, dp=rp.data, expert_parallel=rp.expert_parallel,
            redundant_experts=spec.rollout.redundant_experts, fp8=spec.rollout.fp8,
            seq_len=seq_len, gpu_memory_gb=spec.cluster.gpu_memory_gb,
            utilization=spec.rollout.gpu_memory_utilization,
        )
        return train, rollout, sequences

    memories = _step(memory)
    train_mem, rollout_mem, sequences = (memories if isinstance(memories, tuple)
                                         else (memories,) * 3)

    return Plan(
        train_world_size=world,
        data_parallel=dp,
        expert_tensor_parallel=etp,
        expert_tensor_defaulted=_step(lambda: p.expert_tensor is None),
        expert_data_parallel=expert_dp,
        pipeline_layers=layers,
        micro_batches_per_step=micro_batches,
        rollout_world_size=rollout_world,
        gpus_per_replica=per_replica,
        rollout_replicas=replicas,
        rollout_expert_parallel=_step(lambda: per_replica if rp.expert_parallel else None),
        rl_nodes=_step(lambda: spec.train.nodes + (0 if spec.rollout.placement == "colocated"
                                                    else spec.rollout.nodes)),
        seq_len=seq_len,
        rollouts_per_step=rollouts,
        optimizer_steps_per_rollout=opt_steps,
        stage_budgets=budgets,
        expected_rollouts_per_step=_step(
            lambda: rollouts + sum(b.rollouts_per_step for b in budgets)),
        params=params,
        train_memory=train_mem,
        rollout_memory=rollout_mem,
        routing_dtype=routing_dtype,
        routing_bytes_per_token=routing_bytes,
        rollout_max_sequences=sequences,
        replicas_per_node=_step(lambda: max(1, _div(gpn, per_replica))),
        nodes_per_replica=_step(lambda: max(1, _div(per_replica, gpn))),
        eval_seq_len=_step(lambda: spec.data.max_prompt_tokens
                           + (spec.eval.max_tokens or spec.rollout.max_tokens)),
    )

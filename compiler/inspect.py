"""What `rlspec inspect` and `rlspec status` show. Reads a compiled plan; computes nothing."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

from compiler.api import Compiled
from compiler.submit import FAILED_STATES
from runtime.capabilities import engines


def _gb(x: float) -> str:
    return f"{x:,.1f} GB"


def _params(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e8 else f"{n / 1e6:,.2f} M"


def plan_json(compiled: Compiled) -> dict[str, Any]:
    spec = compiled.validated.source.spec
    return {
        "name": spec.name,
        "plan": compiled.validated.plan.to_dict(),
        "warnings": [w.format() for w in compiled.validated.warnings],
        "jobs": compiled.graph.to_dict()["jobs"],
        "engines": job_engines(compiled),
    }


def job_engines(compiled: Compiled) -> dict[str, tuple[str, ...]]:
    """Each job's engine and device, as the runtime declares them (runtime.capabilities)."""
    spec = compiled.validated.source.spec.model_dump(mode="json")
    return {name: engines(spec, compiled.graph.jobs[name].entry)
            for name in compiled.graph.order()}


def show_summary(out: Console, compiled: Compiled) -> None:
    spec = compiled.validated.source.spec
    plan = compiled.validated.plan
    arch = spec.model.architecture
    p = spec.train.parallelism
    rp = spec.rollout.parallelism

    table = Table(title=f"rlspec plan: {spec.name}", show_header=False, title_justify="left")
    table.add_column("section", style="bold")
    table.add_column("value")

    moe = arch.moe
    table.add_row("model", (
        f"{arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}; "
        f"{_params(plan.params.total)} total / {_params(plan.params.active)} active"
        + (f"; MoE {moe.num_experts} experts top-{moe.top_k} ({moe.score_function}), "
           f"{plan.params.moe_layers} MoE layers" if moe else "; dense")))
    etp = f"ETP {plan.expert_tensor_parallel}" + (" (defaulted to TP)"
                                                   if plan.expert_tensor_defaulted and moe else "")
    table.add_row("trainer", (
        f"{spec.train.backend}: W {plan.train_world_size} = TP {p.tensor} × PP {p.pipeline} × "
        f"CP {p.context} × DP {plan.data_parallel}"
        + (f"; expert grid {etp} × EP {p.expert} × PP {p.pipeline} × expert-DP "
           f"{plan.expert_data_parallel}" if moe else "")
        + f"; SP {'on' if p.sequence_parallel else 'off'}"))
    table.add_row("pipeline", f"layers per stage {list(plan.pipeline_layers)}"
                  + (f", VPP {p.virtual_pipeline}" if p.virtual_pipeline else ""))
    table.add_row("batch", (
        f"global {spec.train.global_batch_size} = micro {spec.train.micro_batch_size} × "
        f"DP {plan.data_parallel} × {plan.micro_batches_per_step} micro-batches"))
    table.add_row("rollout", (
        f"{spec.rollout.engine}: R {plan.rollout_world_size}, {plan.rollout_replicas} replica(s) "
        f"of TP {rp.tensor} × DP {rp.data}"
        + (f", expert-parallel {plan.rollout_expert_parallel}" if plan.rollout_expert_parallel
           else "")
        + (f" with {spec.rollout.redundant_experts} redundant experts (EPLB)"
           if spec.rollout.redundant_experts else "")
        + (f", {plan.nodes_per_replica} nodes each" if plan.nodes_per_replica > 1
           else f", {plan.replicas_per_node} per node")))
    table.add_row("allocation", (
        f"RL job: {plan.rl_nodes} nodes, trainer and rollout engines colocated on the same GPUs"
        if spec.rollout.placement == "colocated" else
        f"RL job: {plan.rl_nodes} nodes = {spec.rollout.nodes} rollout + {spec.train.nodes} trainer"))
    table.add_row("run", (
        f"{plan.rollouts_per_step} rollouts/step ({spec.rollout.prompts_per_step} prompts × "
        f"n {spec.rollout.n}), {plan.optimizer_steps_per_rollout} optimizer step(s) per rollout "
        f"batch, seq len {plan.seq_len}, {spec.train.steps} steps; "
        f"{spec.algorithm.loss} loss, router replay {spec.router_replay.mode}"))
    for b in plan.stage_budgets:
        desc = f"+{b.rollouts_per_step:,.0f}/step expected, worst {b.worst_case_rollouts_per_step:,.0f}"
        if b.one_time_rollouts:
            desc += f"; screening {b.one_time_rollouts:,.0f} (policy-equivalent, amortised)"
        if not b.can_fill_batch_worst_case:
            desc += "; may not fill a batch in the worst case"
        if b.notes:
            desc += "; " + "; ".join(b.notes)
        table.add_row(f"filters[{b.index}] {b.type}", desc)
    table.add_row("expected rollouts", f"{plan.expected_rollouts_per_step:,.0f} per step")
    for label, mem in (("trainer memory", plan.train_memory), ("rollout memory", plan.rollout_memory)):
        if not mem.parts:
            table.add_row(label, "; ".join(mem.notes) or "not estimated")
            continue
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in mem.parts.items())
        notes = "".join(f"\n{note}" for note in mem.notes)
        table.add_row(label, f"{_gb(mem.total_gb)} of {_gb(mem.capacity_gb)} "
                      f"({mem.fraction:.0%}) per GPU: {parts}{notes}")
    if plan.rollout_max_sequences > 0:
        table.add_row("KV cache", f"{plan.rollout_max_sequences} full-length sequences per replica")
    if plan.routing_dtype:
        table.add_row("routing replay", (
            f"{plan.routing_dtype} ids, {plan.routing_bytes_per_token} bytes per token "
            f"({plan.routing_bytes_per_token * plan.seq_len / 1e6:,.2f} MB per full sequence)"))
    table.add_row("jobs", " → ".join(compiled.graph.order()))
    out.print(table)
    runs = Table(title="what each job runs on", show_header=False, title_justify="left")
    runs.add_column("job", style="bold")
    runs.add_column("engine and device")
    for name, what in job_engines(compiled).items():
        runs.add_row(name, "; ".join(what))
    out.print(runs)
    for w in compiled.validated.warnings:
        out.print(w.format(), style="yellow", markup=False)


def show_tree(out: Console, compiled: Compiled) -> None:
    graph = compiled.graph
    tree = Tree(f"[bold]{compiled.validated.source.spec.name}[/]")
    for name in graph.order():
        job = graph.jobs[name]
        node = tree.add(f"[bold]{name}[/] ({job.nodes} node(s)): {job.summary}")
        for dep in graph.dependencies(name):
            node.add(f"after {dep}: reads {', '.join(graph.edge_artifacts(dep, name))}")
        external = [a for a in job.inputs if graph.artifacts[a].external]
        for art in external:
            node.add(f"reads {art} from {graph.artifacts[art].path}")
        node.add(f"writes {', '.join(job.outputs)}")
    out.print(tree)


def show_job(out: Console, compiled: Compiled, name: str) -> None:
    prefix = f"jobs/{name}/"
    for path in sorted(p for p in compiled.files if p.startswith(prefix)):
        lexer = "json" if path.endswith(".json") else "bash"
        out.rule(path)
        if out.is_terminal:
            out.print(Syntax(compiled.files[path], lexer, word_wrap=True))
        else:  # piped: the file exactly as written
            out.file.write(compiled.files[path])


def show_status(out: Console, record: Any) -> None:
    table = Table(title=f"jobs ({record.backend})", title_justify="left")
    for col in ("job", "id", "state", "log"):
        table.add_column(col)
    for name, job in record.jobs.items():
        style = ("green" if job["state"] == "COMPLETED"
                 else "red" if job["state"] in FAILED_STATES or job["state"] == "CANCELLED" else "")
        table.add_row(name, str(job.get("id") or "-"), f"[{style}]{job['state']}[/]" if style
                      else job["state"], str(job.get("log") or job.get("reason") or "-"))
    out.print(table)
    failed = [n for n, j in record.jobs.items() if j["state"] in FAILED_STATES]
    for name in failed:
        state = record.jobs[name]["state"]
        why = "" if state == "FAILED" else f" ({state})"
        out.print(f"[red]{name} failed{why}[/]; log: {record.jobs[name].get('log')}")

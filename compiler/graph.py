"""The job graph: which jobs a spec needs, what each produces and consumes.

Jobs are nodes of a networkx DAG; an edge A → B carries the artifacts B reads that A
writes. Which jobs exist follows from the spec:

    data        data.generator set            → dataset
    init        model.checkpoint is null      → policy_init (HF, random weights)
    sft         sft set                       → policy_sft (HF)
    to_hf       model.checkpoint in Megatron format → policy_init (HF, for the rollout engines)
    convert     train.backend megatron, unless the user's Megatron checkpoint is used as is
                                          → policy_megatron
                (to_hf and convert run on the trainer's nodes, in its layout)
    screen      an offline_pass_rate stage    → pass_rates (surviving prompts + rates)
    eval_before eval.enabled                  → eval_before (metrics)
    rl          always                        → policy_final (HF), rl_metrics
    eval_after  eval.enabled                  → eval_after (metrics)
    export      export set                    → export (HF safetensors)

The user's files are external artifacts: ``dataset`` (data.train), ``eval_dataset``
(data.eval: read by the eval jobs, and by rl when eval.every_steps > 0; without it they
read the generated dataset's eval split), ``policy_init`` / ``user_checkpoint``,
``proxy_model``.

A job input no job produces and the user did not provide is a dangling artifact: an error,
as is a cycle. Both would be compiler bugs, so they are checked on every build.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import networkx as nx

from compiler.plan import Plan
from spec.models import OfflinePassRate, Spec


class GraphError(Exception):
    """The graph is not a DAG of resolvable artifacts (a compiler bug, never a user error)."""


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str  # dataset | hf_checkpoint | megatron_checkpoint | pass_rates | metrics
    path: str  # relative to the run directory, or as the user wrote it when external
    external: bool = False  # provided by the user, not produced by a job


@dataclass(frozen=True)
class Job:
    name: str
    entry: str  # runtime module the job runs: python -m runtime.jobs.<entry>
    summary: str
    nodes: int
    gpus_per_node: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # Role split of a multi-role allocation (the RL job): role → number of nodes, in order.
    roles: tuple[tuple[str, int], ...] = ()


@dataclass
class JobGraph:
    jobs: dict[str, Job]
    artifacts: dict[str, Artifact]
    dag: nx.DiGraph = field(repr=False)

    def order(self) -> list[str]:
        """Jobs in dependency order; ties broken by name so the order is reproducible."""
        return list(nx.lexicographical_topological_sort(self.dag))

    def dependencies(self, job: str) -> list[str]:
        return sorted(self.dag.predecessors(job))

    def edge_artifacts(self, src: str, dst: str) -> list[str]:
        return list(self.dag.edges[src, dst]["artifacts"])

    def to_dict(self) -> dict:
        return {
            "jobs": [
                {**asdict(self.jobs[n]), "depends_on": self.dependencies(n)} for n in self.order()
            ],
            "artifacts": {k: asdict(v) for k, v in sorted(self.artifacts.items())},
            "edges": [
                {"from": a, "to": b, "artifacts": self.edge_artifacts(a, b)}
                for a, b in sorted(self.dag.edges)
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def build_graph(spec: Spec, plan: Plan) -> JobGraph:
    """Pure: spec + plan → JobGraph. Raises GraphError on a cycle or dangling artifact."""
    gpus = spec.cluster.gpus_per_node
    artifacts: dict[str, Artifact] = {}
    jobs: dict[str, Job] = {}

    def add(job: Job) -> None:
        jobs[job.name] = job

    # Sources the user provides.
    if spec.model.checkpoint is not None:
        if spec.model.checkpoint_format == "hf":
            artifacts["policy_init"] = Artifact(
                "policy_init", "hf_checkpoint", spec.model.checkpoint, external=True)
        else:
            artifacts["user_checkpoint"] = Artifact(
                "user_checkpoint", "megatron_checkpoint", spec.model.checkpoint, external=True)
    if spec.data.generator is None:
        artifacts["dataset"] = Artifact("dataset", "dataset", spec.data.train or "", external=True)
    if spec.data.eval is not None:
        artifacts["eval_dataset"] = Artifact("eval_dataset", "dataset", spec.data.eval,
                                             external=True)
    # Held-out prompts: the user's data.eval file, else the generated folder's eval split.
    held_out = "eval_dataset" if spec.data.eval is not None else "dataset"

    if spec.data.generator is not None:
        artifacts["dataset"] = Artifact("dataset", "dataset", "artifacts/dataset")
        add(Job("data", "data", "generate the train/eval splits of the embedded task",
                1, 0, (), ("dataset",)))
    if spec.model.checkpoint is None:
        artifacts["policy_init"] = Artifact("policy_init", "hf_checkpoint", "artifacts/policy_init")
        add(Job("init", "init", "initialise the policy from its architecture (HF format)",
                1, 0, (), ("policy_init",)))
    elif spec.model.checkpoint_format == "megatron":
        # The rollout engines load HF weights: export the user's Megatron checkpoint once.
        artifacts["policy_init"] = Artifact("policy_init", "hf_checkpoint", "artifacts/policy_init")
        add(Job("to_hf", "convert", "convert the Megatron checkpoint to HF for the rollout engines",
                spec.train.nodes, gpus, ("user_checkpoint",), ("policy_init",)))
    if spec.sft is not None:
        artifacts["policy_sft"] = Artifact("policy_sft", "hf_checkpoint", "artifacts/policy_sft")
        add(Job("sft", "sft", "supervised cold start", spec.train.nodes, gpus,
                ("policy_init", "dataset"), ("policy_sft",)))
    policy = "policy_sft" if "sft" in jobs else "policy_init"  # the HF policy RL starts from
    # The Megatron checkpoint RL starts from: the user's, unless SFT changed the policy or
    # the user gave HF weights; then the conversion job makes it.
    megatron_start = (
        "user_checkpoint" if "user_checkpoint" in artifacts and "sft" not in jobs
        else "policy_megatron"
    )
    if spec.train.backend == "megatron" and megatron_start == "policy_megatron":
        artifacts["policy_megatron"] = Artifact(
            "policy_megatron", "megatron_checkpoint", "artifacts/policy_megatron")
        add(Job("convert", "convert", "convert the HF policy to a Megatron checkpoint",
                spec.train.nodes, gpus, (policy,), ("policy_megatron",)))

    screen = next((s for s in spec.filters if isinstance(s, OfflinePassRate)), None)
    if screen is not None:
        artifacts["pass_rates"] = Artifact("pass_rates", "pass_rates", "artifacts/pass_rates")
        proxy_inputs: tuple[str, ...] = (policy,) if screen.proxy_model == "policy" else ()
        if screen.proxy_model != "policy":
            artifacts["proxy_model"] = Artifact(
                "proxy_model", "hf_checkpoint", screen.proxy_model, external=True)
            proxy_inputs = ("proxy_model",)
        add(Job("screen", "screen", "offline pass-rate filter on the proxy model (ZVE stage 1)",
                screen.nodes, gpus, ("dataset", *proxy_inputs), ("pass_rates",)))

    if spec.eval.enabled:
        artifacts["eval_before"] = Artifact("eval_before", "metrics", "artifacts/eval_before")
        artifacts["eval_after"] = Artifact("eval_after", "metrics", "artifacts/eval_after")
        add(Job("eval_before", "evaluate", "held-out accuracy of the initial policy",
                spec.rollout.nodes, gpus, (held_out, policy), ("eval_before",)))

    rl_inputs = ["dataset", policy]
    if spec.train.backend == "megatron":
        rl_inputs.append(megatron_start)
    if screen is not None:
        rl_inputs.append("pass_rates")
    if spec.eval.every_steps and held_out not in rl_inputs:  # the in-run evaluation
        rl_inputs.append(held_out)
    artifacts["policy_final"] = Artifact("policy_final", "hf_checkpoint", "artifacts/policy_final")
    artifacts["rl_metrics"] = Artifact("rl_metrics", "metrics", "artifacts/rl")
    add(Job("rl", "rl", "RL: rollout engines, trainer and reward/filter driver in one allocation",
            plan.rl_nodes, gpus, tuple(rl_inputs), ("policy_final", "rl_metrics"),
            roles=(("rollout", spec.rollout.nodes), ("train", spec.train.nodes))))

    if spec.eval.enabled:
        add(Job("eval_after", "evaluate", "held-out accuracy of the trained policy",
                spec.rollout.nodes, gpus, (held_out, "policy_final"), ("eval_after",)))
    if spec.export is not None:
        artifacts["export"] = Artifact("export", "hf_checkpoint", "export")
        add(Job("export", "export", f"export the final policy ({spec.export.format}, "
                f"{spec.export.dtype})", 1, 0, ("policy_final",), ("export",)))

    return _link(jobs, artifacts)


def _link(jobs: dict[str, Job], artifacts: dict[str, Artifact]) -> JobGraph:
    """Connect producers to consumers; reject dangling artifacts and cycles."""
    producer: dict[str, str] = {}
    for job in jobs.values():
        for out in job.outputs:
            if out in producer:
                raise GraphError(f"artifact {out!r} is produced by {producer[out]} and {job.name}")
            producer[out] = job.name
    dag = nx.DiGraph()
    dag.add_nodes_from(sorted(jobs))
    for job in jobs.values():
        for art in job.inputs:
            if art not in artifacts:
                raise GraphError(f"job {job.name!r} reads {art!r}, which nothing provides")
            if art in producer:
                src = producer[art]
                if dag.has_edge(src, job.name):
                    dag.edges[src, job.name]["artifacts"].append(art)
                else:
                    dag.add_edge(src, job.name, artifacts=[art])
            elif not artifacts[art].external:
                raise GraphError(f"job {job.name!r} reads {art!r}, which no job produces")
    if not nx.is_directed_acyclic_graph(dag):
        cycle = " → ".join(a for a, _ in nx.find_cycle(dag))
        raise GraphError(f"job graph has a cycle: {cycle}")
    return JobGraph(jobs=jobs, artifacts=artifacts, dag=dag)

"""Rendering: (spec, plan, graph) → the files of a bundle, as a dict path → text. Pure.

Every generated file comes from a jinja2 template in `templates/` (StrictUndefined: a
missing value is a compiler error, never an empty string in a script). Every value that
reaches a shell goes through the `q` filter (shlex.quote) or is a number from the plan.
Nothing here reads the clock or the environment, so the same spec gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
import yaml

from compiler import __version__
from compiler.graph import Artifact, Job, JobGraph
from compiler.plan import Plan
from runtime import capabilities
from spec.models import SFT_OPTIMIZER, Spec

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

# Fixed ports inside an exclusive allocation (vLLM's default API port, torchrun's, vLLM's DP RPC).
ROLLOUT_BASE_PORT = 8000
MASTER_PORT = 29500
DP_RPC_PORT = 13345


def _quote(value: Any) -> str:
    return shlex.quote(str(value))


def _shell_path(artifact: Artifact) -> str:
    """A shell word for an artifact's path: run-relative ones are anchored at $RLSPEC_RUN_DIR."""
    if artifact.external and PurePosixPath(artifact.path).is_absolute():
        return _quote(artifact.path)
    if artifact.external:  # compiler.inputs anchors the spec's own; a hand-written config's
        return '"$RLSPEC_BUNDLE_DIR"/../' + _quote(artifact.path)
    return '"$RLSPEC_RUN_DIR"/' + _quote(artifact.path)


# system.weight_sync → the backend of vLLM 0.33's `--weight-transfer-config` (`WeightTransferConfig`,
# whose one field `backend` must name an engine of `WeightTransferEngineFactory`). `disk` has no
# transfer engine: vLLM reloads the checkpoint folder through `/collective_rpc reload_weights`
# (runtime.rollout.weight_transfer), so it passes no config.
VLLM_WEIGHT_TRANSFER_BACKENDS = {"nccl": "nccl", "ipc": "ipc"}


def vllm_weight_transfer_config(weight_sync: str) -> str | None:
    """The JSON value of `vllm serve --weight-transfer-config` for `weight_sync` (None: no flag)."""
    backend = VLLM_WEIGHT_TRANSFER_BACKENDS.get(weight_sync)
    return None if backend is None else json.dumps({"backend": backend}, separators=(",", ":"))


def vllm_eplb_config(redundant_experts: int) -> str:
    """The JSON value of `vllm serve --eplb-config` (vLLM's `EPLBConfig`; with `--enable-eplb`)."""
    return json.dumps({"num_redundant_experts": redundant_experts}, separators=(",", ":"))


def _dot_id(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates cached per user (keyed by template source): compile stays fast."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "rlspec" / f"jinja-{__version__}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: compile the templates every time
        return None
    return jinja2.FileSystemBytecodeCache(str(folder))


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        bytecode_cache=_bytecode_cache(),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        # bash's ${#array[@]} would open a jinja comment: use {## ... ##} for those instead.
        comment_start_string="{##",
        comment_end_string="##}",
    )
    env.filters.update(q=_quote, shell_path=_shell_path, dot_id=_dot_id,
                       tojson_sorted=_json, to_yaml=_yaml,
                       vllm_weight_transfer_config=vllm_weight_transfer_config,
                       vllm_eplb_config=vllm_eplb_config)
    return env


def resolved_spec(spec: Spec) -> dict[str, Any]:
    """The spec with every default filled in, as plain JSON data."""
    return spec.model_dump(mode="json")


def spec_hash(resolved: dict[str, Any]) -> str:
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SlurmRequest:
    """What one job asks of Slurm (rendered into sbatch.sh, sent by `rlspec submit`)."""

    job_name: str
    nodes: int
    gpus_per_node: int
    cpus_per_task: int  # of the node's one task, which runs all its ranks
    time: str
    extra: dict[str, str]  # partition / account / qos, when set
    mem: str | None = None  # --mem: "<N>G", "0" (all of the node's memory), or None
    exclusive: bool = False  # --exclusive


def slurm_request(spec: Spec, job: Job) -> SlurmRequest:
    c = spec.cluster
    extra = {k: v for k, v in (("partition", c.partition), ("account", c.account),
                               ("qos", c.qos)) if v}
    gpus = job.gpus_per_node if c.devices == "gpu" else 0
    # One Slurm task per node runs the node's ranks (torchrun's, or the engines' GPUs):
    # cluster.cpus_per_task is per rank, Slurm's --cpus-per-task is that task's.
    ranks = job.gpus_per_node or 1
    mem = f"{c.mem_gb}G" if c.mem_gb is not None else ("0" if gpus else None)
    return SlurmRequest(f"{spec.name}-{job.name}", job.nodes, gpus, c.cpus_per_task * ranks,
                        c.time_limit, extra, mem=mem, exclusive=bool(gpus) and c.exclusive)


def engine_layout(spec: Spec, plan: Plan, nodes: int) -> dict[str, int | bool]:
    """The vLLM replicas that ``nodes`` nodes hold (the RL job's rollout nodes, or all nodes of
    a screen / eval job) and their ports; replica sizes come from the plan."""
    return {
        "engine_nodes": nodes,
        "replicas": nodes * plan.replicas_per_node // plan.nodes_per_replica,
        "replicas_per_node": plan.replicas_per_node,
        "nodes_per_replica": plan.nodes_per_replica,
        "local_data_parallel": max(1, spec.cluster.gpus_per_node // spec.rollout.parallelism.tensor),
        "base_port": ROLLOUT_BASE_PORT,
        "dp_rpc_port": DP_RPC_PORT,
        "colocated": False,  # the engines share their GPUs with the trainer (rl_layout)
    }


def rl_layout(spec: Spec, plan: Plan) -> dict[str, int | bool]:
    """Node split and ports of the RL allocation (all sizes come from the plan)."""
    return {
        **engine_layout(spec, plan, spec.rollout.nodes),
        "rollout_nodes": spec.rollout.nodes,
        "train_nodes": spec.train.nodes,
        "colocated": spec.rollout.placement == "colocated",
        "master_port": MASTER_PORT,
    }


# Jobs that sample from the policy: on vLLM (``rollout.engine: vllm``) each starts replicas on
# all its nodes, as the RL job's rollout nodes do, and runs its entry point once against them.
SERVED_ENTRIES = ("screen", "evaluate")


def engine_settings(spec: Spec, plan: Plan, job: Job) -> dict[str, Any]:
    """What a job's engines serve: the longest sequence its requests make (an evaluation's
    eval.max_tokens, the RL job's in-run eval too) and whether they record routed experts
    (R3 replays the RL job's only: recording costs generation speed, and a dense proxy
    model could not serve it)."""
    if job.entry == "evaluate":
        longest = plan.eval_seq_len
    elif job.entry == "rl" and spec.eval.every_steps > 0:
        longest = max(plan.seq_len, plan.eval_seq_len)
    else:
        longest = plan.seq_len
    return {"engine_len": longest,
            "routed_experts": job.entry == "rl" and spec.router_replay.mode == "r3"}


def job_config(spec_data: dict, plan: Plan, graph: JobGraph, job: Job) -> dict[str, Any]:
    """The runtime config of one job: all a job reads (runtime never imports the compiler)."""
    def paths(names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        return {n: {"path": graph.artifacts[n].path, "kind": graph.artifacts[n].kind,
                    "external": graph.artifacts[n].external} for n in names}

    return {
        "rlspec_version": __version__,
        "job": job.name,
        "entry": job.entry,
        "inputs": paths(job.inputs),
        "outputs": paths(job.outputs),
        "spec": spec_data,
        "derived": plan.to_dict(),
    }


def family_flags(spec: Spec) -> dict[str, Any]:
    """What the family's attention has, for train.sh's Megatron flags (``--qk-layernorm``,
    ``--add-qkv-bias``, ``--rotary-percent``), from the runtime's one declaration
    (``runtime.capabilities``); the trainer checks them against the checkpoint's config."""
    arch = spec.model.architecture
    dumped = arch.model_dump(mode="json")
    return {"qk_norm": capabilities.qk_norm(dumped),
            "qkv_bias": arch.family in capabilities.QKV_BIAS_FAMILIES,
            "rotary_percent": capabilities.rotary_percent(dumped)}


def hf_input(graph: JobGraph, job: Job) -> Artifact | None:
    """The HF checkpoint a job reads (the policy it serves or trains from; None for the
    conversion of a Megatron checkpoint to HF)."""
    return next((graph.artifacts[a] for a in job.inputs
                 if graph.artifacts[a].kind == "hf_checkpoint"), None)


def render_bundle(spec: Spec, plan: Plan, graph: JobGraph, *, source_text: str,
                  source_name: str, overrides: tuple[str, ...] = ()) -> dict[str, str]:
    """All files of the bundle, relative path → text; `manifest.json` describes the rest."""
    env = environment()
    data = resolved_spec(spec)
    digest = spec_hash(data)
    order = graph.order()
    dependencies = {n: graph.dependencies(n) for n in order}
    output_dir = PurePosixPath(spec.cluster.output_dir)
    base = {"version": __version__, "spec": spec, "plan": plan, "spec_hash": digest}

    def render(template: str, **ctx: Any) -> str:
        return env.get_template(template).render(**base, **ctx)

    files: dict[str, str] = {
        "spec.yaml": source_text,  # what the user wrote, comments and all
        "spec.resolved.yaml": render("spec.resolved.yaml.j2", resolved=data),
        "env.sh": render("env.sh.j2", output_dir_absolute=output_dir.is_absolute(),
                         run_dir=str(output_dir / spec.name)),
        "lib.sh": render("lib.sh.j2"),
        "graph.json": graph.to_json(),
        "graph.dot": render("graph.dot.j2", order=order, graph=graph,
                            graph_dict=graph.to_dict()),
        "submit.sh": render("submit.sh.j2", order=order, dependencies=dependencies),
    }
    rl_job = graph.jobs["rl"]
    rl_inputs = [graph.artifacts[a] for a in rl_job.inputs]
    policy = hf_input(graph, rl_job)
    megatron = next((a for a in rl_inputs if a.kind == "megatron_checkpoint"), None)
    layout = rl_layout(spec, plan)
    requests = {}
    for name in order:
        job = graph.jobs[name]
        slurm = slurm_request(spec, job)
        requests[name] = slurm
        ctx = {"job": job, "slurm": slurm, "layout": layout, "policy_path": policy,
               "megatron_path": megatron, **engine_settings(spec, plan, job)}
        folder = f"jobs/{name}"
        launch = "rl/launch.sh.j2" if name == "rl" else "job/launch.sh.j2"
        if job.entry in ("sft", "convert") and spec.train.backend == "megatron":
            # the Megatron trainer's ranks in the train layout (convert: its very flags)
            launch = "job/megatron_launch.sh.j2"
            files[f"{folder}/train.sh"] = render(
                "rl/train.sh.j2", family=family_flags(spec), entry=job.entry,
                sft_optimizer=SFT_OPTIMIZER, **{**ctx, "policy_path": hf_input(graph, job)})
        if job.entry in SERVED_ENTRIES and spec.rollout.engine == "vllm":
            ctx.update(layout=engine_layout(spec, plan, job.nodes),
                       policy_path=hf_input(graph, job))
            launch = "job/served_launch.sh.j2"
            files[f"{folder}/rollout.sh"] = render("rl/rollout.sh.j2", **ctx)
        files[f"{folder}/launch.sh"] = render(launch, **ctx)
        files[f"{folder}/sbatch.sh"] = render("job/sbatch.sh.j2", **ctx)
        files[f"{folder}/config.json"] = render(
            "json.j2", value=job_config(data, plan, graph, job))
        if name == "rl":
            files[f"{folder}/rollout.sh"] = render("rl/rollout.sh.j2", **ctx)
            files[f"{folder}/train.sh"] = render("rl/train.sh.j2", family=family_flags(spec),
                                                 entry="train", **ctx)

    manifest = {
        "rlspec_version": __version__,
        "name": spec.name,
        "spec_file": source_name,
        "spec_sha256": digest,
        "overrides": list(overrides),
        "scheduler": spec.cluster.scheduler,
        "order": order,
        "jobs": {
            name: {
                "entry": graph.jobs[name].entry,
                "summary": graph.jobs[name].summary,
                "launch": f"jobs/{name}/launch.sh",
                "depends_on": dependencies[name],
                "inputs": list(graph.jobs[name].inputs),
                "outputs": list(graph.jobs[name].outputs),
                "roles": dict(graph.jobs[name].roles),
                "resources": asdict(requests[name]),
            }
            for name in order
        },
        "artifacts": {k: asdict(v) for k, v in sorted(graph.artifacts.items())},
        "env_passthrough": list(spec.cluster.env_passthrough),
        "files": {path: file_hash(text) for path, text in sorted(files.items())},
    }
    files["manifest.json"] = render("json.j2", value=manifest)
    return files

"""Rules on the system, the scheduler and the nodes of each job."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from runtime.capabilities.refusal import Refusal, _replica_processes, _uses_embedded_trainer


def weight_sync(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """``disk``: the trainer writes each step's weights to an HF folder that the engines
    reload; ``ipc`` (the tensors shared in one node's memory) and ``nccl`` (a broadcast in
    vLLM's NCCL wire format) run on the CPU into the embedded engine only, the folder still
    written. ``ipc``: the trainer also shares the tensors and the engines of its node map
    them (``runtime.rollout.shared_weights``), wired for the CPU (shared memory of one node)
    into the embedded engine: vLLM's IPC backend maps CUDA memory only, and on GPUs the
    trainer's side (CUDA IPC from the rank that holds the gathered weights, into every engine
    GPU) is not built. ``nccl``: the trainer broadcasts each version to the engines in vLLM's
    NCCL wire format (``runtime.rollout.broadcast_transfer``), wired for the CPU (a gloo
    group) into the embedded engine: vLLM's NCCL backend needs CUDA, and on GPUs the trainer
    does not join vLLM's NCCL group yet."""
    mode = spec["system"]["weight_sync"]
    gpu = spec["cluster"]["devices"] == "gpu"
    if mode == "nccl" and gpu:
        yield Refusal("weight_sync", ("system", "weight_sync"),
                      "weight_sync nccl on GPUs: the trainer does not join the engines' NCCL "
                      "group yet (its broadcast runs over gloo on the CPU)",
                      "set system.weight_sync: disk")
    elif mode == "ipc" and gpu:
        yield Refusal("weight_sync", ("system", "weight_sync"),
                      "weight_sync ipc on GPUs: the trainer shares its weights over CPU shared "
                      "memory only; CUDA IPC into the engines' GPUs is not built",
                      "set system.weight_sync: disk")
    elif mode == "ipc" and max(spec["train"]["nodes"], spec["rollout"]["nodes"]) > 1:
        yield Refusal("weight_sync", ("system", "weight_sync"),
                      f"weight_sync ipc: the trainer shares its weights in its first node's "
                      f"memory, which the engines of the other nodes (train.nodes "
                      f"{spec['train']['nodes']}, rollout.nodes {spec['rollout']['nodes']}) "
                      "cannot map", "set system.weight_sync: disk, or one node")
    elif mode != "disk" and spec["rollout"]["engine"] == "vllm":
        needs, embedded = {
            "nccl": ("NCCL backend needs CUDA", "receives the trainer's broadcast over gloo"),
            "ipc": ("IPC backend maps CUDA memory", "maps the trainer's shared memory"),
        }[mode]
        yield Refusal("weight_sync", ("system", "weight_sync"),
                      f"weight_sync {mode}: vLLM's {needs}, which vLLM's CPU build does not "
                      "have", "set system.weight_sync: disk, or rollout.engine: local (the "
                      f"embedded engine {embedded})")


def placement(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Colocated engines (``rollout.placement: colocated``, ``runtime.placement``) sleep
    while the trainer steps: they cannot generate steps ahead of the trainer meanwhile
    (``system.max_staleness`` > 0). Sleep mode releases memory of vLLM's CUDA memory pool;
    vLLM's CPU build has none and refuses ``--enable-sleep-mode`` at start."""
    rollout = spec["rollout"]
    if rollout["placement"] != "colocated":
        return
    k = spec["system"]["max_staleness"]
    if k:
        yield Refusal("placement", ("system", "max_staleness"),
                      f"colocated engines sleep while the trainer steps, so they cannot "
                      f"generate the {k} step(s) ahead of it that max_staleness {k} asks for",
                      "set system.max_staleness: 0, or rollout.placement: disaggregated")
    if rollout["engine"] == "vllm" and spec["cluster"]["devices"] == "cpu":
        yield Refusal("placement", ("rollout", "placement"),
                      "colocated engines sleep through vLLM's --enable-sleep-mode, which needs "
                      "CUDA memory: vLLM's CPU build refuses it",
                      "set rollout.engine: local (the embedded engine sleeps on CPU), or "
                      "rollout.placement: disaggregated")


def container(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Containers are started by Slurm's pyxis (``srun --container-image``); a local run
    starts its processes on this machine directly."""
    cluster = spec["cluster"]
    if cluster.get("container") is not None and cluster["scheduler"] == "local":
        yield Refusal("container", ("cluster", "container"),
                      "the local scheduler runs the jobs on this machine and starts no container",
                      "remove cluster.container, or set cluster.scheduler: slurm")


# --------------------------------------------------------------------------- nodes


def local_nodes(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The local scheduler runs each role of the RL job once, on this machine
    (``rlspec_run_on`` starts one task): a second trainer node (Megatron would wait for node
    ranks that never start) or a second rollout node (its engines would never start, its
    endpoints would repeat the first node's) cannot run."""
    if spec["cluster"]["scheduler"] != "local":
        return
    for role, path in (("trainer", ("train", "nodes")), ("rollout engines", ("rollout", "nodes"))):
        nodes = spec[path[0]]["nodes"]
        if nodes > 1 and not (role == "trainer" and _uses_embedded_trainer(spec)):
            yield Refusal("local_nodes", path,
                          f"the local scheduler runs the {role} once, on this machine: "
                          f"{path[0]}.nodes {nodes} asks for nodes it does not have",
                          f"set {path[0]}.nodes: 1, or cluster.scheduler: slurm")


def embedded_trainer_nodes(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The embedded trainer is one process: on more trainer nodes each node would start its
    own copy, all reading the same batches and writing the same weights."""
    nodes = spec["train"]["nodes"]
    if _uses_embedded_trainer(spec) and nodes > 1:
        yield Refusal("embedded_trainer_nodes", ("train", "nodes"),
                      f"the embedded trainer is one process: on train.nodes {nodes} every "
                      "trainer node would start its own copy of it",
                      "set train.nodes: 1, or train.backend: megatron")


def _screen_stage(spec: Mapping[str, Any]) -> tuple[int, Mapping[str, Any]] | None:
    """The first ``offline_pass_rate`` stage (the one the screen job runs) and its index."""
    return next(((i, st) for i, st in enumerate(spec["filters"])
                 if st["type"] == "offline_pass_rate"), None)


def screen_nodes(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The screen job shards its prompts over the tasks Slurm starts, one per node; the local
    scheduler starts one, so the other shards would never come. On vLLM its nodes hold whole
    engine replicas."""
    found = _screen_stage(spec)
    if found is None:
        return
    i, stage = found
    rollout = spec["rollout"]
    per_replica = _replica_processes(spec)
    span = max(1, per_replica // spec["cluster"]["gpus_per_node"])  # nodes of one replica
    if rollout["engine"] == "vllm" and stage["nodes"] % span:
        yield Refusal("screen_nodes", ("filters", i, "nodes"),
                      f"one vLLM replica spans {span} nodes (rollout.parallelism {per_replica} "
                      f"GPUs): {stage['nodes']} screen nodes do not hold whole replicas",
                      f"set filters[{i}].nodes to a multiple of {span}")
    if spec["cluster"]["scheduler"] != "local":
        return
    if stage["nodes"] > 1:
        yield Refusal("screen_nodes", ("filters", i, "nodes"),
                      f"the local scheduler runs the screen job once, on this machine: nodes "
                      f"{stage['nodes']} would wait for shards no other node screens",
                      f"set filters[{i}].nodes: 1, or cluster.scheduler: slurm")

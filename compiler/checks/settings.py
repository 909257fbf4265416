"""Settings the selected path (trainer, engine, scheduler, devices) does not read: warnings."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pydantic import BaseModel

from compiler.checks._common import (
    GPU_MEM,
    MOE,
    Path,
    _warning,
)
from compiler.plan import Plan
from spec.errors import Problem
from spec.models import Spec

# --------------------------------------------------------------------------- unused settings


def _changed(section: BaseModel, names: Iterable[str]) -> list[tuple[str, object]]:
    """(name, value) of the fields of ``section`` whose value differs from the model default."""
    fields = type(section).model_fields
    return [(n, getattr(section, n)) for n in names if getattr(section, n) != fields[n].default]


def _show(value: object) -> str:
    """A value as YAML writes it (true / false / null)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


_LOCAL_TRAINER_WHY = "the embedded trainer is one process: it has no model parallelism"
_LOCAL_ENGINE_WHY = "the embedded engine is one torch process per replica: it serves " \
                    "unsharded, without vLLM's memory pool or sequence limit"


def unused_settings(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Settings the selected path does not read, when they differ from their default (a
    harmless no-op, but not what was meant; each warning names the path that would read it):

    - train.backend local: the Megatron layout (``train.parallelism.*``),
      ``optimizer.distributed`` and ``moe.token_dispatcher`` (the embedded trainer is one
      process);
    - rollout.engine local: ``gpu_memory_utilization``, ``max_num_seqs`` and
      ``parallelism.expert_parallel`` (vLLM's); ``parallelism.tensor`` / ``data`` only set how
      many devices each embedded replica claims, so they divide the replica count;
    - train.optimizer.cpu_offload false: ``offload_fraction`` (the share offloaded);
    - cluster.scheduler local: ``partition``, ``account``, ``qos`` and ``max_requeues``
      (Slurm's; its resource requests ``cpus_per_task``, ``exclusive`` and ``mem_gb`` are
      ``cluster_settings``');
    - cluster.devices cpu: ``gpu_memory_gb`` (memory is compared for GPU runs only)."""
    backend: Path = ("train", "backend")
    if spec.train.backend == "local":
        fields = ("tensor", "pipeline", "virtual_pipeline", "context", "expert", "expert_tensor",
                  "sequence_parallel", "first_pipeline_stage_layers", "last_pipeline_stage_layers")
        for name, value in _changed(spec.train.parallelism, fields):
            yield _warning(("train", "parallelism", name),
                           f"train.parallelism.{name} is {_show(value)} but has no effect with "
                           f"train.backend: local; {_LOCAL_TRAINER_WHY}",
                           f"remove train.parallelism.{name}, or set train.backend: megatron",
                           (backend,))
        for name, value in _changed(spec.train.optimizer, ("distributed",)):
            yield _warning(("train", "optimizer", name),
                           f"train.optimizer.{name} is {_show(value)} but has no effect with "
                           "train.backend: local; the embedded trainer is one process and keeps "
                           "the whole optimizer state", f"remove train.optimizer.{name}",
                           (backend,))
        moe = spec.model.architecture.moe
        for name, value in _changed(moe, ("token_dispatcher",)) if moe is not None else ():
            yield _warning((*MOE, name), f"moe.{name} is {value} but has no effect with "
                                         f"train.backend: local; {_LOCAL_TRAINER_WHY} (every "
                                         "expert runs on its one rank)",
                           f"remove model.architecture.moe.{name}", (backend,))
    if not spec.train.optimizer.cpu_offload:
        for name, value in _changed(spec.train.optimizer, ("offload_fraction",)):
            yield _warning(("train", "optimizer", name),
                           f"train.optimizer.{name} is {_show(value)} but has no effect without "
                           "train.optimizer.cpu_offload: true (nothing is offloaded)",
                           f"remove train.optimizer.{name}, or set cpu_offload: true",
                           (("train", "optimizer", "cpu_offload"),))
    engine: Path = ("rollout", "engine")
    if spec.rollout.engine == "local":
        for name, value in _changed(spec.rollout, ("gpu_memory_utilization", "max_num_seqs")):
            yield _warning(("rollout", name),
                           f"rollout.{name} is {_show(value)} but has no effect with "
                           f"rollout.engine: local; {_LOCAL_ENGINE_WHY}",
                           f"remove rollout.{name}, or set rollout.engine: vllm", (engine,))
        rp = spec.rollout.parallelism
        for name, value in _changed(rp, ("tensor", "data", "expert_parallel")):
            effect = (f"; it only makes each replica claim {plan.gpus_per_replica} device(s), so "
                      f"the rollout nodes run {plan.rollout_replicas} replica(s) instead of "
                      f"{plan.rollout_world_size}" if name != "expert_parallel" else "")
            yield _warning(("rollout", "parallelism", name),
                           f"rollout.parallelism.{name} is {_show(value)} but the embedded engine "
                           f"does not shard its model (rollout.engine: local){effect}",
                           f"remove rollout.parallelism.{name}, or set rollout.engine: vllm",
                           (engine,))
    if spec.cluster.scheduler == "local":
        for name, value in _changed(spec.cluster, ("partition", "account", "qos")):
            yield _warning(("cluster", name),
                           f"cluster.{name} is {_show(value)} but has no effect with "
                           "cluster.scheduler: local (only a Slurm request carries it)",
                           f"remove cluster.{name}, or set cluster.scheduler: slurm",
                           (("cluster", "scheduler"),))
        for name, value in _changed(spec.cluster, ("max_requeues",)):
            yield _warning(("cluster", name),
                           f"cluster.{name} is {_show(value)} but has no effect with "
                           "cluster.scheduler: local (only a Slurm job requeues itself before "
                           "its time limit)", f"remove cluster.{name}, or set "
                           "cluster.scheduler: slurm", (("cluster", "scheduler"),))
    if spec.cluster.devices == "cpu":
        for name, value in _changed(spec.cluster, ("gpu_memory_gb",)):
            yield _warning(GPU_MEM, f"cluster.{name} is {_show(value)} but has no effect with "
                                    "cluster.devices: cpu (memory per GPU is compared for GPU "
                                    "runs only)", f"remove cluster.{name}",
                           (("cluster", "devices"),))

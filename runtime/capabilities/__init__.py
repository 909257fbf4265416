"""What each path of the runtime can run, declared once: the jobs and the compiler read it.

A spec selects one path per axis: the trainer (``train.backend``: the embedded HF trainer
or megatron-core), the rollout engine (``rollout.engine``: the embedded server or vLLM), the
scheduler (``cluster.scheduler``) and the devices (``cluster.devices``). Each rule below
yields a :class:`Refusal` for a setting the selected path cannot honour: the spec field that
asks for it, what is wrong, and the way out. A setting the path honours, or that has no
meaning on it, passes.

Two readers of one declaration, so they cannot drift:

* the jobs: each job's preflight (``runtime.preflight``) runs the rules of its entry point at
  start, before it loads weights or starts processes, and the job refuses to start;
* the compiler: ``rlspec validate`` / ``compile`` run every job's preflight on the bundle they
  build, so whatever a job would refuse after hours in the queue is refused on the login node.

Rules read the resolved spec as plain data (the ``spec`` of a job's config.json, or the
compiler's ``Spec.model_dump(mode="json")``). This module imports the standard library only:
the compiler imports it without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from runtime.capabilities.hardware import (
    VLLM_CPU_EXPERT_ALIGNMENT,  # noqa: F401  (re-exported)
    VLLM_CPU_HEAD_DIMS,  # noqa: F401  (re-exported)
    devices,
    megatron_cpu,
    optimizer_offload,
    precision,
    recompute,
    tokenizer,
    vllm_cpu,
)
from runtime.capabilities.layout import FLAG_PATHS, megatron_flag_refusals  # noqa: F401
from runtime.capabilities.models import (
    DENSE_FAMILIES,
    EMBEDDED_FAMILIES,
    MEGATRON_FAMILIES,
    PARTIAL_ROTARY,
    QK_NORM_FAMILIES,
    QKV_BIAS_FAMILIES,
    SIGMOID_MOE_FAMILIES,
    TRAINER_ATTENTION,
    aux_loss,
    dense_replay,
    embedded_model,
    megatron_model,
    qk_norm,
    rotary_percent,
)
from runtime.capabilities.refusal import (
    ARCH,  # noqa: F401  (re-exported)
    MOE,  # noqa: F401  (re-exported)
    Refusal,
    Rule,
    SpecPath,  # noqa: F401  (re-exported)
    _uses_embedded_engine,
    _uses_embedded_trainer,
    _uses_megatron,
)
from runtime.capabilities.system import (
    container,
    embedded_trainer_nodes,
    local_nodes,
    placement,
    screen_nodes,
    weight_sync,
)

__all__ = ["DENSE_FAMILIES", "EMBEDDED_FAMILIES", "JOB_RULES", "MEGATRON_FAMILIES",
           "PARTIAL_ROTARY", "QKV_BIAS_FAMILIES", "QK_NORM_FAMILIES", "RULES",
           "SIGMOID_MOE_FAMILIES", "TRAINER_ATTENTION", "Refusal", "engines", "qk_norm",
           "refusals", "rotary_percent", "rules_for"]

RULES: dict[str, Rule] = {
    "embedded_model": embedded_model,
    "megatron_model": megatron_model,
    "dense_replay": dense_replay,
    "aux_loss": aux_loss,
    "weight_sync": weight_sync,
    "placement": placement,
    "container": container,
    "precision": precision,
    "devices": devices,
    "megatron_cpu": megatron_cpu,
    "recompute": recompute,
    "tokenizer": tokenizer,
    "optimizer_offload": optimizer_offload,
    "local_nodes": local_nodes,
    "embedded_trainer_nodes": embedded_trainer_nodes,
    "screen_nodes": screen_nodes,
    "vllm_cpu": vllm_cpu,
}

# The flag rule is checked against train.sh, not the spec: listed for the field table.
FLAG_RULES: dict[str, Callable[[Any], list[Refusal]]] = {"megatron_layout": megatron_flag_refusals}

_ALL_JOBS = ("container",)
# The rules each job entry point runs at start (``runtime.jobs.<entry>``).
JOB_RULES: dict[str, tuple[str, ...]] = {
    "data": _ALL_JOBS,
    "init": (*_ALL_JOBS, "embedded_model"),
    # the HF policy_init is read by the embedded engine; with train.backend megatron the SFT
    # runs on the Megatron trainer (its flags: runtime.preflight)
    "sft": (*_ALL_JOBS, "embedded_model", "megatron_model", "megatron_cpu", "optimizer_offload"),
    "screen": (*_ALL_JOBS, "embedded_model", "screen_nodes", "vllm_cpu"),
    "evaluate": (*_ALL_JOBS, "embedded_model", "vllm_cpu"),
    # the conversion runs the RL trainer's Megatron flags on its nodes (runtime.preflight)
    "convert": (*_ALL_JOBS, "megatron_model", "megatron_cpu"),
    "export": _ALL_JOBS,
    "rl": (*_ALL_JOBS, "megatron_model", "dense_replay", "aux_loss", "weight_sync", "placement",
           "precision",
           "devices", "megatron_cpu", "recompute", "tokenizer",
           "local_nodes", "embedded_trainer_nodes", "optimizer_offload", "vllm_cpu"),
}


def engines(spec: Mapping[str, Any], entry: str) -> tuple[str, ...]:
    """What job ``entry`` runs its work on, in words, for ``rlspec inspect``: the engine of
    each role and its device, as the job's code chooses them."""
    dev = "GPU" if spec["cluster"]["devices"] == "gpu" else "CPU"
    trainer = ("Megatron-core trainer, " + ("NCCL" if dev == "GPU" else "gloo") + f" on {dev}"
               if _uses_megatron(spec) else "embedded HF trainer on CPU")
    engine = (f"vLLM replicas on {dev}" if not _uses_embedded_engine(spec)
              else "embedded rollout server on CPU")
    one_model = (f"vLLM replicas on {dev} (every node; the rollout client on the batch host)"
                 if not _uses_embedded_engine(spec)
                 else f"embedded HF engine on {dev} (one process per node)")
    return {
        "data": ("task generator on CPU",),
        "init": ("HF model built from the architecture on CPU",),
        "sft": (("Megatron-core trainer in the train layout, "
                 + ("NCCL" if dev == "GPU" else "gloo") + f" on {dev}")
                if _uses_megatron(spec) else f"embedded HF trainer on {dev}",),
        "screen": (one_model,),
        "evaluate": (one_model,),
        "convert": ("HF ↔ Megatron conversion in the train layout, "
                    + ("NCCL" if dev == "GPU" else "gloo") + f" on {dev}",),
        "export": ("safetensors conversion on CPU",),
        "rl": (f"trainer: {trainer}", f"rollout: {engine}", "driver: rewards and filters on CPU",
               "weights: " + WEIGHT_ROUTES[spec["system"]["weight_sync"]]),
    }.get(entry, ())


WEIGHT_ROUTES = {
    "disk": "each step's folder, reloaded by the engines (disk)",
    "ipc": "mapped from the trainer's shared memory (ipc; a resumed run's first load from its "
           "folder)",
    "nccl": "broadcast by the trainer over gloo in vLLM's NCCL wire format (nccl; a resumed "
            "run's first load from its folder)",
}


def rules_for(entry: str, spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The rule names job ``entry`` runs on ``spec``; the RL job checks the embedded model
    only when its trainer or engine is the embedded one."""
    names = JOB_RULES.get(entry, _ALL_JOBS)
    if entry == "rl" and (_uses_embedded_trainer(spec) or _uses_embedded_engine(spec)):
        names = (*names, "embedded_model")
    return names


def refusals(spec: Mapping[str, Any], entry: str, job: str = "") -> list[Refusal]:
    """Every refusal of the rules job ``entry`` runs (see :data:`JOB_RULES`)."""
    from dataclasses import replace

    return [replace(r, job=job or entry)
            for name in rules_for(entry, spec) for r in RULES[name](spec)]

"""A bundle's ``train.sh`` edited by hand, checked as the spec its flags describe.

The Megatron trainer runs the layout its ``train.sh`` flags give, and validate checked the
spec's. So ``rlspec check`` renders the bundle's spec again, parses both ``train.sh`` files
with the trainer's own parser, turns each flag that differs into the spec key that renders
it (``SPEC_KEYS``), and validates the bundle's spec with those keys set: an edited
``--tensor-model-parallel-size 3`` meets the same layout checks as ``tensor: 3`` in the
spec. A differing flag no spec key renders is listed as not checked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spec.errors import Problem, SpecError

__all__ = ["EditedTrainSh", "check_edited_train_sh"]

# Parsed flag (runtime.megatron.args) → the spec key that renders it (templates/rl/train.sh.j2).
SPEC_KEYS: dict[str, str] = {
    "tensor_model_parallel_size": "train.parallelism.tensor",
    "pipeline_model_parallel_size": "train.parallelism.pipeline",
    "num_virtual_stages_per_pipeline_rank": "train.parallelism.virtual_pipeline",
    "decoder_first_pipeline_num_layers": "train.parallelism.first_pipeline_stage_layers",
    "decoder_last_pipeline_num_layers": "train.parallelism.last_pipeline_stage_layers",
    "context_parallel_size": "train.parallelism.context",
    "sequence_parallel": "train.parallelism.sequence_parallel",
    "expert_model_parallel_size": "train.parallelism.expert",
    "expert_tensor_parallel_size": "train.parallelism.expert_tensor",
    "micro_batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size",
    "use_distributed_optimizer": "train.optimizer.distributed",
    "optimizer_cpu_offload": "train.optimizer.cpu_offload",
    "optimizer_offload_fraction": "train.optimizer.offload_fraction",
    "num_layers": "model.architecture.num_layers",
    "hidden_size": "model.architecture.hidden_size",
    "ffn_hidden_size": "model.architecture.ffn_hidden_size",
    "num_attention_heads": "model.architecture.num_attention_heads",
    "num_query_groups": "model.architecture.num_query_groups",
    "num_experts": "model.architecture.moe.num_experts",
    "moe_router_topk": "model.architecture.moe.top_k",
    "moe_ffn_hidden_size": "model.architecture.moe.expert_ffn_hidden_size",
    "moe_token_dispatcher_type": "model.architecture.moe.token_dispatcher",
    # the launcher's, not the trainer's parser (LAUNCHER)
    "nnodes": "train.nodes",
    "nproc_per_node": "cluster.gpus_per_node",
}
SFT_KEYS = {"global_batch_size": "sft.batch_size"}
LAUNCHER = re.compile(r"--(nnodes|nproc-per-node) (\d+)")
AFTER_SETS = re.compile(r" \(after --set [^()]*\)")  # spec.loader.locate's, for a parent key


@dataclass(frozen=True)
class EditedTrainSh:
    """One edited train.sh: its flags that differ, and what validating them found."""

    job: str
    changed: dict[str, Any]  # flag → edited value
    problems: list[Problem]
    unchecked: list[str]  # flags that differ which no spec key renders


def _flags(text: str, entry: str) -> dict[str, Any]:
    from runtime.preflight import train_sh_args

    flags = vars(train_sh_args(text, entry))
    flags.update({m.group(1).replace("-", "_"): int(m.group(2)) for m in LAUNCHER.finditer(text)})
    return flags


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_edited_train_sh(resolved: Path, job: str, entry: str, edited: str,
                          rendered: str) -> EditedTrainSh:
    """Validate the bundle's ``spec.resolved.yaml`` (``resolved``: its user paths absolute)
    with the keys of the flags in which ``edited`` (its ``jobs/<job>/train.sh``) differs from
    ``rendered`` (what that spec renders)."""
    from compiler.api import validate
    from runtime.megatron.args import MegatronArgsError

    rl = entry == "rl"
    try:
        mine, theirs = _flags(edited, entry), _flags(rendered, entry)
    except MegatronArgsError:  # the preflight says which flag does not parse
        return EditedTrainSh(job, {}, [], [])
    changed = {flag: value for flag, value in mine.items() if theirs.get(flag) != value}
    keys = {**SPEC_KEYS, **({} if rl else SFT_KEYS)}
    chosen = dict(changed)
    if "tensor_model_parallel_size" in changed and mine.get("expert_tensor_parallel_size"):
        # The spec's unset ETP follows TP; the file's ETP flag stays what it was rendered.
        chosen["expert_tensor_parallel_size"] = mine["expert_tensor_parallel_size"]
    sets = {f"{keys[flag]}={_yaml(value)}": flag for flag, value in chosen.items() if flag in keys}
    unchecked = sorted(flag for flag in changed if flag not in keys)
    try:
        validate(resolved, list(sets))
        problems: list[Problem] = []
    except SpecError as err:
        problems = [_from_train_sh(p, job, sets, chosen) for p in err.problems]
    return EditedTrainSh(job, changed, problems, unchecked)


def _from_train_sh(problem: Problem, job: str, sets: Mapping[str, str],
                   values: Mapping[str, Any]) -> Problem:
    """A problem that came from a key set for an edited flag names that flag."""
    for text, flag in sets.items():
        suffix = f" (from --set {text})"
        if problem.message.endswith(suffix):
            flag_text = f"--{flag.replace('_', '-')} {_yaml(values[flag])}"
            return replace(problem, file=f"jobs/{job}/train.sh",
                           message=problem.message[: -len(suffix)] + f" (edited: {flag_text})")
    return replace(problem, message=AFTER_SETS.sub(f" (with the edited jobs/{job}/train.sh)",
                                                   problem.message))


def edited_train_sh(bundle: Path, manifest: Mapping[str, Any]) -> list[EditedTrainSh]:
    """Each hand-edited ``jobs/<job>/train.sh`` of ``bundle``, checked (module doc)."""
    from compiler.api import compile_spec
    from compiler.bundle import verify_bundle

    changed = {bad.split(" ")[0] for bad in verify_bundle(bundle, manifest)
               if bad.endswith(" (changed)")}
    edited = [(job, f"jobs/{job}/train.sh") for job in manifest["order"]
              if f"jobs/{job}/train.sh" in changed]
    if not edited:
        return []
    resolved = bundle / "spec.resolved.yaml"
    rendered = compile_spec(resolved, preflight=False).files
    return [check_edited_train_sh(resolved, job, manifest["jobs"][job]["entry"],
                                  (bundle / rel).read_text(encoding="utf-8"), rendered[rel])
            for job, rel in edited]


def describe(found: EditedTrainSh) -> list[str]:
    """What ``rlspec check`` says of an edited train.sh besides its problems."""
    flags = ", ".join(f"--{f.replace('_', '-')} {_yaml(v)}" for f, v in found.changed.items())
    lines = [f"jobs/{found.job}/train.sh is edited ({flags or 'no flag changed'}): checked as "
             "the bundle's spec with the keys that render those flags"]
    if found.unchecked:
        lines.append("  not checked (no spec key renders them): "
                     + ", ".join(f"--{f.replace('_', '-')}" for f in found.unchecked))
    return lines

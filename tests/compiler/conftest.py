"""Fixtures of the compiler tests: a valid GPU MoE spec, and specs built from it by dotted edits.

`build({"train.parallelism.tensor": 4, "filters": [...]})` returns a `Spec` made from a deep
copy of BASE with each edit applied (`a.b[2].c` or `a.b.2.c` paths; the value DELETE removes
the key), validated with `Spec.model_validate`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from compiler.checks import check
from compiler.plan import Plan, make_plan
from spec.errors import Problem
from spec.models import Spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RECIPES = Path(__file__).parent / "recipes"

DELETE = object()

# A Qwen3-30B-A3B-shaped run on 2 trainer nodes + 1 rollout node: no errors, no warnings.
BASE: dict[str, Any] = {
    "name": "base",
    "model": {
        "checkpoint": "/models/base",
        "architecture": {
            "family": "qwen3_moe",
            "num_layers": 48,
            "hidden_size": 2048,
            "ffn_hidden_size": 6144,
            "num_attention_heads": 32,
            "num_query_groups": 4,
            "head_dim": 128,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "moe": {"num_experts": 128, "top_k": 8, "expert_ffn_hidden_size": 768},
        },
    },
    "cluster": {
        "scheduler": "slurm",
        "partition": "gpu",
        "gpus_per_node": 8,
        "gpu_memory_gb": 80.0,
    },
    "train": {
        "nodes": 2,
        "parallelism": {"tensor": 2, "sequence_parallel": True, "expert": 8, "expert_tensor": 1},
        "micro_batch_size": 1,
        "global_batch_size": 64,
        "recompute": "full",
        "steps": 100,
    },
    "rollout": {
        "nodes": 1,
        "parallelism": {"tensor": 4, "data": 2, "expert_parallel": True},
        "n": 8,
        "prompts_per_step": 32,
        "max_tokens": 4096,
    },
    "data": {"train": "/data/train.jsonl", "eval": "/data/eval.jsonl", "max_prompt_tokens": 1024},
    "reward": {"verifiers": [{"type": "math"}]},
}

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(path: str) -> list[str | int]:
    return [int(i) if i else (int(k) if k.isdigit() else k) for k, i in _PART.findall(path)]


def edit(data: dict[str, Any], path: str, value: Any) -> None:
    """Set (or, with DELETE, remove) one dotted path in nested dicts/lists, creating dicts."""
    parts = _parts(path)
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, dict) and part not in node:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = copy.deepcopy(value)


def build(edits: Mapping[str, Any] | None = None, base: Mapping[str, Any] = BASE) -> Spec:
    """A Spec from a copy of `base` with dotted `edits` applied."""
    data = copy.deepcopy(dict(base))
    for path, value in (edits or {}).items():
        edit(data, path, value)
    return Spec.model_validate(data)


def problems_of(spec: Spec) -> list[Problem]:
    return check(spec, make_plan(spec))


def errors_of(spec: Spec) -> list[Problem]:
    return [p for p in problems_of(spec) if p.severity == "error"]


@pytest.fixture
def make_spec() -> Callable[..., Spec]:
    return build


@pytest.fixture
def plan_of() -> Callable[[Spec], Plan]:
    return make_plan

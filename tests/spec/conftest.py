"""Fixtures of the spec tests: a minimal valid spec (a tiny MoE on the embedded task)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from spec.errors import Problem, SpecError
from spec.loader import load_spec

MINIMAL: dict[str, Any] = {
    "name": "tiny",
    "model": {
        "architecture": {
            "family": "qwen3_moe",
            "num_layers": 2,
            "hidden_size": 64,
            "ffn_hidden_size": 128,
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "vocab_size": 512,
            "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 32},
        }
    },
    "train": {"global_batch_size": 64, "steps": 10},
    "rollout": {"n": 8, "prompts_per_step": 8, "max_tokens": 16},
    "data": {"generator": {"type": "arithmetic"}},
    "reward": {"verifiers": [{"type": "arithmetic"}]},
}

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def minimal_spec() -> dict[str, Any]:
    """The shared, read-only minimal spec (session-scoped so hypothesis tests may use it)."""
    return MINIMAL


@pytest.fixture
def spec_dict() -> dict[str, Any]:
    """A fresh copy of the minimal spec, free to edit."""
    return copy.deepcopy(MINIMAL)


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[[str], Path]:
    """Write YAML text to a file and return its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def problems_of(write_spec: Callable[..., Path]) -> Callable[..., list[Problem]]:
    """Load YAML text (or a dict, dumped) that must be invalid; return its problems."""

    def problems(source: str | dict[str, Any], overrides: tuple[str, ...] = ()) -> list[Problem]:
        text = source if isinstance(source, str) else yaml.safe_dump(source, sort_keys=False)
        with pytest.raises(SpecError) as info:
            load_spec(write_spec(text), overrides)
        return info.value.problems

    return problems

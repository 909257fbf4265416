"""Fixtures of the embedded rollout engine's tests (test_rollout, test_rollout_sleep,
test_fp8): a tiny Qwen3-MoE checkpoint folder per module, another one's weights, and one
torch thread while a module runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.runtime.tiny_moe import save_tiny_moe, save_tokenizer


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The tiny model's ops are far too small for intra-op parallelism; on a shared 2-core
    machine two OpenMP threads per op make it 10× slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3-MoE (seed 0) and its character tokenizer."""
    path = tmp_path_factory.mktemp("tiny_moe")
    save_tiny_moe(path, seed=0)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture with other weights (seed 1): a trained step's stand-in."""
    path = tmp_path_factory.mktemp("tiny_moe_step1")
    save_tiny_moe(path, seed=1)
    return path

"""Fixtures of the megatron-core tests: the CPU patches, applied for one test and undone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def megatron_cpu() -> Iterator[None]:
    """``runtime.megatron.cpu.enable_cpu()`` for the test, ``disable_cpu()`` after it."""
    from runtime.megatron.cpu import disable_cpu, enable_cpu

    enable_cpu()
    try:
        yield
    finally:
        disable_cpu()

"""The device ``bench/gpu.py`` runs on: CUDA, or the CPU for a rehearsal of the script
(``--rehearse``: megatron-core patched for the CPU, gloo, float32, nothing measured). The
sections read :data:`DEVICE` when they run."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

DEVICE = "cuda"  # "cpu": a rehearsal (--rehearse)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def release() -> None:
    from runtime.megatron.parallel import destroy_parallel

    destroy_parallel()
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def timed_steps(step: Callable[[int], Any], warmup: int, reps: int) -> list[float]:
    for i in range(warmup):
        step(i)
    sync()
    times = []
    for i in range(reps):
        start = time.perf_counter()
        step(warmup + i)
        sync()
        times.append(time.perf_counter() - start)
    return times

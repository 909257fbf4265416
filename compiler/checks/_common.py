"""What the compiler checks share: the Problem constructors (`_error`, `_warning`), the spec
paths the rules name, the memory margin, and small integer helpers for the hints."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from compiler.plan import Plan
from spec.errors import PathPart, Problem
from spec.models import Spec

Path = tuple[PathPart, ...]
Rule = Callable[[Spec, Plan], Iterable[Problem]]

TP: Path = ("train", "parallelism", "tensor")
PP: Path = ("train", "parallelism", "pipeline")
VPP: Path = ("train", "parallelism", "virtual_pipeline")
CP: Path = ("train", "parallelism", "context")
EP: Path = ("train", "parallelism", "expert")
ETP: Path = ("train", "parallelism", "expert_tensor")
SP: Path = ("train", "parallelism", "sequence_parallel")
FIRST: Path = ("train", "parallelism", "first_pipeline_stage_layers")
LAST: Path = ("train", "parallelism", "last_pipeline_stage_layers")
TRAIN_NODES: Path = ("train", "nodes")
GPN: Path = ("cluster", "gpus_per_node")
GBS: Path = ("train", "global_batch_size")
MBS: Path = ("train", "micro_batch_size")
ARCH: Path = ("model", "architecture")
MOE: Path = (*ARCH, "moe")
R_TP: Path = ("rollout", "parallelism", "tensor")
R_DP: Path = ("rollout", "parallelism", "data")
R_EP: Path = ("rollout", "parallelism", "expert_parallel")
R_NODES: Path = ("rollout", "nodes")
MAX_TOKENS: Path = ("rollout", "max_tokens")
PROMPT_TOKENS: Path = ("data", "max_prompt_tokens")
MAX_POS: Path = (*ARCH, "max_position_embeddings")
HEAD_DIM: Path = (*ARCH, "head_dim")
GPU_MEM: Path = ("cluster", "gpu_memory_gb")

NEAR_MEMORY = 0.9  # within 10 % of capacity: a warning


def _error(path: Path, message: str, suggestion: str | None = None,
           related: Iterable[Path] = ()) -> Problem:
    return Problem(path, message, suggestion, "error", related=tuple(related))


def _warning(path: Path, message: str, suggestion: str | None = None,
             related: Iterable[Path] = ()) -> Problem:
    return Problem(path, message, suggestion, "warning", related=tuple(related))


def _nearest(value: int, ok: Callable[[int], bool], limit: int | None = None) -> list[int]:
    """The closest integers ≥ 1 below and above `value` for which `ok` holds (value excluded)."""
    hi = limit if limit is not None else 4 * value + 64
    out = [v for v in (next((v for v in range(value - 1, 0, -1) if ok(v)), None),
                       next((v for v in range(value + 1, hi + 1) if ok(v)), None))
           if v is not None]
    return out


def _or(values: Iterable[int]) -> str:
    return " or ".join(str(v) for v in values)


def _divisors(n: int) -> list[int]:
    """Divisors of n in increasing order, in O(√n) (specs may hold absurd numbers)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _multiples_near(value: int, step: int) -> list[int]:
    """The multiples of `step` nearest to `value` (below, if ≥ 1, and above)."""
    below = (value // step) * step
    return [m for m in (below if below != value else below - step, below + step) if m >= 1]


def _list(values: list[int], most: int = 8) -> str:
    return ", ".join(str(v) for v in values[:most]) + (", …" if len(values) > most else "")

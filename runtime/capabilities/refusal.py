"""The refusal a rule yields, and what the rules share: spec paths and the selected paths."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

SpecPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Refusal:
    """One setting a job cannot run: the spec path that asks for it, why, and the way out."""

    rule: str
    path: SpecPath
    message: str
    hint: str
    job: str = ""

    def format(self) -> str:
        where = ".".join(str(p) for p in self.path)
        job = f"job {self.job}: " if self.job else ""
        return f"{job}{where}: {self.message}\n    hint: {self.hint}"


Rule = Callable[[Mapping[str, Any]], Iterator[Refusal]]


def _uses_embedded_trainer(spec: Mapping[str, Any]) -> bool:
    return spec["train"]["backend"] == "local"


def _uses_megatron(spec: Mapping[str, Any]) -> bool:
    return spec["train"]["backend"] == "megatron"


def _uses_embedded_engine(spec: Mapping[str, Any]) -> bool:
    return spec["rollout"]["engine"] == "local"


def _replica_processes(spec: Mapping[str, Any]) -> int:
    """Devices (processes on the CPU) of one engine replica: tensor × data parallel."""
    parallelism = spec["rollout"]["parallelism"]
    return parallelism["tensor"] * parallelism["data"]


ARCH: SpecPath = ("model", "architecture")
MOE: SpecPath = (*ARCH, "moe")

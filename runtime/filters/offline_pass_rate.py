r"""Stage 1 — offline pass-rate filter (runs before RL).

A proxy model (``proxy_model``: "policy" = the initial checkpoint, or a path) samples
``k = samples_per_prompt`` answers per prompt at ``temperature``; with 0/1 rewards the
pass rate of prompt i is ``p_i = mean_j reward_ij``. Rules (boundaries included)::

    drop as too easy  if p_i ≥ max_pass_rate
    drop as hopeless  if min_pass_rate is not None and p_i ≤ min_pass_rate
    keep otherwise

(comparisons with a 1e-12 tolerance, so ``7/8 ≥ 0.875`` holds). The survivors and every
prompt's pass rate form an artifact (:class:`ScreenResult`, JSONL via
``write_jsonl`` / ``read_jsonl``) that the RL job reads; the adaptive group size stage
starts its pass-rate estimates from it.

Cost, in policy rollouts, booked in the ledger's ``screening``::

    screening = N · k · proxy_cost_ratio / reuse_epochs

(the screen is shared by ``reuse_epochs`` epochs, each of which is charged its share).

``sample_fn(prompt_ids, k)`` is the driver's callback: it returns, per prompt, k rewards
(a list of lists or an ``[N, k]`` array; rewards may be fractional). It is called once
with all prompts; the driver batches as it likes. ``nodes`` (the screening job's size in
the spec) is not used here: the screen job shards the prompts over its nodes
(``runtime.jobs.screen``) and hands the merged rewards over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.filters.base import PromptId, Stage

__all__ = ["OfflinePassRate", "SampleFn", "ScreenResult"]

SampleFn = Callable[[Sequence[PromptId], int], Any]
_TOL = 1e-12


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"prompt id {x!r} is not JSON serialisable")


@dataclass
class ScreenResult:
    """Pass rates of every screened prompt, which survived, and the screen's cost."""

    prompt_ids: list[PromptId]
    pass_rates: np.ndarray  # [N] float
    kept: np.ndarray  # [N] bool
    samples_per_prompt: int
    proxy_model: str = "policy"
    proxy_cost_ratio: float = 1.0
    reuse_epochs: int = 1

    @property
    def survivors(self) -> list[PromptId]:
        return [p for p, k in zip(self.prompt_ids, self.kept.tolist(), strict=True) if k]

    @property
    def samples(self) -> int:
        return len(self.prompt_ids) * self.samples_per_prompt

    @property
    def cost(self) -> float:
        """Weighted screening cost in policy rollouts (module doc)."""
        return self.samples * self.proxy_cost_ratio / self.reuse_epochs

    def pass_rate_of(self) -> dict[PromptId, float]:
        return dict(zip(self.prompt_ids, self.pass_rates.tolist(), strict=True))

    def write_jsonl(self, path: str | os.PathLike[str]) -> None:
        """First line ``{"meta": {...}}``, then one ``{"prompt_id", "pass_rate", "kept"}`` per prompt."""
        meta = {"samples_per_prompt": self.samples_per_prompt, "proxy_model": self.proxy_model,
                "proxy_cost_ratio": self.proxy_cost_ratio, "reuse_epochs": self.reuse_epochs}
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"meta": meta}) + "\n")
            for pid, p, k in zip(self.prompt_ids, self.pass_rates.tolist(), self.kept.tolist(),
                                 strict=True):
                row = {"prompt_id": pid, "pass_rate": p, "kept": k}
                f.write(json.dumps(row, default=_plain) + "\n")

    @classmethod
    def read_jsonl(cls, path: str | os.PathLike[str]) -> ScreenResult:
        ids: list[PromptId] = []
        rates: list[float] = []
        kept: list[bool] = []
        meta: dict[str, Any] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if "meta" in row:
                    meta = row["meta"]
                    continue
                ids.append(row["prompt_id"])
                rates.append(float(row["pass_rate"]))
                kept.append(bool(row["kept"]))
        if "samples_per_prompt" not in meta:
            raise ValueError(f"{path}: no meta line")
        return cls(ids, np.asarray(rates, dtype=np.float64), np.asarray(kept, dtype=bool),
                   **meta)


class OfflinePassRate(Stage):
    """Screen prompts with a proxy model before RL; drop too-easy / hopeless ones."""

    type = "offline_pass_rate"

    def __init__(
        self,
        proxy_model: str = "policy",
        samples_per_prompt: int = 8,
        max_pass_rate: float = 1.0,
        min_pass_rate: float | None = None,
        proxy_cost_ratio: float = 1.0,
        reuse_epochs: int = 1,
        temperature: float = 1.0,
        nodes: int = 1,
    ) -> None:
        super().__init__()
        if samples_per_prompt < 1 or reuse_epochs < 1 or proxy_cost_ratio <= 0:
            raise ValueError("samples_per_prompt, reuse_epochs ≥ 1 and proxy_cost_ratio > 0")
        if min_pass_rate is not None and min_pass_rate >= max_pass_rate:
            raise ValueError("min_pass_rate must be below max_pass_rate")
        self.proxy_model = proxy_model
        self.samples_per_prompt = int(samples_per_prompt)
        self.max_pass_rate = float(max_pass_rate)
        self.min_pass_rate = None if min_pass_rate is None else float(min_pass_rate)
        self.proxy_cost_ratio = float(proxy_cost_ratio)
        self.reuse_epochs = int(reuse_epochs)
        self.temperature = float(temperature)
        self.nodes = int(nodes)

    def params(self) -> dict[str, Any]:
        return {"proxy_model": self.proxy_model, "samples_per_prompt": self.samples_per_prompt,
                "max_pass_rate": self.max_pass_rate, "min_pass_rate": self.min_pass_rate,
                "proxy_cost_ratio": self.proxy_cost_ratio, "reuse_epochs": self.reuse_epochs,
                "temperature": self.temperature}

    def keep_mask(self, pass_rates: np.ndarray) -> np.ndarray:
        """The rule of the module doc on an array of pass rates."""
        p = np.asarray(pass_rates, dtype=np.float64)
        keep = p < self.max_pass_rate - _TOL
        if self.min_pass_rate is not None:
            keep &= p > self.min_pass_rate + _TOL
        return keep

    def run(self, prompts: Sequence[PromptId], sample_fn: SampleFn) -> ScreenResult:
        """Screen ``prompts`` with ``sample_fn`` and return the artifact."""
        ids = list(prompts)
        k = self.samples_per_prompt
        raw = sample_fn(ids, k)
        msg = f"sample_fn must return {k} rewards for each of {len(ids)} prompts"
        try:
            arr = np.asarray(raw, dtype=np.float64)
        except ValueError as e:  # ragged
            raise ValueError(msg) from e
        if not ids and arr.size == 0:
            arr = arr.reshape(0, k)
        if arr.shape != (len(ids), k):
            raise ValueError(msg + f", got shape {arr.shape}")
        rates = arr.mean(axis=1) if len(ids) else np.zeros(0)
        keep = self.keep_mask(rates)
        self.stats["prompts_screened"] += len(ids)
        self.stats["samples"] += len(ids) * k
        self.stats["dropped_too_easy"] += int((rates >= self.max_pass_rate - _TOL).sum())
        if self.min_pass_rate is not None:
            self.stats["dropped_hopeless"] += int((rates <= self.min_pass_rate + _TOL).sum())
        self.stats["kept"] += int(keep.sum())
        result = ScreenResult(ids, rates, keep, k, self.proxy_model, self.proxy_cost_ratio,
                              self.reuse_epochs)
        self.stats["screening_cost"] += result.cost
        return result

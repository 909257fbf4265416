r"""Stage 2 — adaptive group size.

A group of n responses to a prompt with pass rate p is *mixed* (has reward variance)
with probability ``mix(p, n) = 1 − pⁿ − (1 − p)ⁿ``, which rises with n. A prompt whose
estimated pass rate is extreme grows its group::

    extreme(p)  ⇔  p ≤ x  or  p ≥ 1 − x                        (x = extreme_pass_rate)
    n'(p)       =  smallest m ∈ [n, max_n] with mix(p, m) ≥ target
                   (target = target_mixed_probability; compared with a 1e-12 tolerance,
                   so a size that reaches the target exactly is taken; max_n when none
                   does, e.g. p = 0 or 1); n for prompts that are not extreme

Budget. Per selection round of R requests the rollouts are capped at
``floor(budget · R · n)``. When ``Σ n'_i`` exceeds the cap, every prompt starts at n
and the ``cap − R·n`` extra rollouts are handed out one at a time to the prompt whose
next rollout raises its mixed probability most,
``mix(p, m + 1) − mix(p, m) = pᵐ(1 − p) + (1 − p)ᵐ p`` (ties: the earlier request),
never beyond its ``n'_i``. That gain decreases in m, so the greedy allocation
maximises the expected number of mixed groups under the cap.

Pass-rate estimates. Per prompt the stage keeps discounted success / trial counts
``(s, t)``: the offline artifact initialises them to ``(p·k, k)``; every observed
group (correctness from verifier scores, or raw rewards rescaled to [0, 1]) updates
``s ← decay·s + Σ correct``, ``t ← decay·t + n`` (``estimate_decay`` = 0.5 by default,
so the estimate follows a changing policy). The pass rate used above is the posterior
mean under a Jeffreys prior, ``p̂ = (s + ½)/(t + 1)``: a prompt that went 0/8 in the
screen is treated as p̂ ≈ 0.056, not as hopeless (which would always give max_n).
Prompts never observed keep n.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np

from runtime.filters.base import Group, PromptId, Request, Stage
from runtime.filters.offline_pass_rate import ScreenResult

__all__ = ["AdaptiveGroupSize", "allocate_budget", "grown_group_size", "mixed_probability"]

_TOL = 1e-12


def mixed_probability(p: np.ndarray | float, n: np.ndarray | int) -> np.ndarray:
    """``1 − pⁿ − (1 − p)ⁿ``: probability that n Bernoulli(p) rewards are not all equal."""
    p = np.asarray(p, dtype=np.float64)
    return 1.0 - p**n - (1.0 - p) ** n


def grown_group_size(p: np.ndarray | float, n: int, target: float, max_n: int) -> np.ndarray:
    """Smallest m in [n, max_n] with mix(p, m) ≥ target (max_n if none); vectorised over p."""
    p = np.atleast_1d(np.asarray(p, dtype=np.float64))
    if max_n <= n:
        return np.full(p.shape, n, dtype=np.int64)
    sizes = np.arange(n, max_n + 1)
    ok = mixed_probability(p[:, None], sizes[None, :]) >= target - _TOL
    first = np.where(ok.any(axis=1), ok.argmax(axis=1), len(sizes) - 1)
    return sizes[first]


def allocate_budget(p: np.ndarray, wanted: np.ndarray, base: np.ndarray, cap: int) -> np.ndarray:
    """Group sizes in [base, wanted] with Σ ≤ cap, by greedy marginal gain (module doc)."""
    wanted = np.asarray(wanted, dtype=np.int64)
    if int(wanted.sum()) <= cap:
        return wanted.copy()
    sizes = np.asarray(base, dtype=np.int64).copy()
    extra = cap - int(sizes.sum())
    heap = []
    for i in np.flatnonzero(wanted > sizes).tolist():
        q, m = float(p[i]), int(sizes[i])
        heap.append((-(q**m * (1 - q) + (1 - q) ** m * q), i))
    heapq.heapify(heap)
    while extra > 0 and heap:
        _, i = heapq.heappop(heap)
        sizes[i] += 1
        extra -= 1
        m = int(sizes[i])
        if m < wanted[i]:
            q = float(p[i])
            heapq.heappush(heap, (-(q**m * (1 - q) + (1 - q) ** m * q), i))
    return sizes


class AdaptiveGroupSize(Stage):
    """Grow the group of prompts whose estimated pass rate is near 0 or 1."""

    type = "adaptive_group_size"

    def __init__(
        self,
        extreme_pass_rate: float = 0.1,
        target_mixed_probability: float = 0.8,
        max_n: int = 64,
        budget: float = 1.5,
        estimate_decay: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0 < extreme_pass_rate < 0.5:
            raise ValueError("extreme_pass_rate must be in (0, 0.5)")
        if not 0 < target_mixed_probability < 1:
            raise ValueError("target_mixed_probability must be in (0, 1)")
        if budget < 1 or max_n < 1 or not 0 <= estimate_decay <= 1:
            raise ValueError("budget ≥ 1, max_n ≥ 1 and estimate_decay in [0, 1]")
        self.extreme_pass_rate = float(extreme_pass_rate)
        self.target_mixed_probability = float(target_mixed_probability)
        self.max_n = int(max_n)
        self.budget = float(budget)
        self.estimate_decay = float(estimate_decay)
        self._counts: dict[PromptId, tuple[float, float]] = {}

    def params(self) -> dict[str, Any]:
        return {"extreme_pass_rate": self.extreme_pass_rate, "max_n": self.max_n,
                "target_mixed_probability": self.target_mixed_probability,
                "budget": self.budget}

    # ---- estimates
    def load(self, screen: ScreenResult) -> None:
        """Initialise the estimates from the offline artifact: (s, t) = (p·k, k)."""
        k = float(screen.samples_per_prompt)
        for pid, p in zip(screen.prompt_ids, screen.pass_rates.tolist(), strict=True):
            self._counts[pid] = (p * k, k)

    def set_counts(self, prompt_id: PromptId, successes: float, trials: float) -> None:
        """Set a prompt's (s, t) directly (e.g. from an earlier run)."""
        self._counts[prompt_id] = (float(successes), float(trials))

    def estimate(self, prompt_id: PromptId) -> float | None:
        """p̂ = (s + ½)/(t + 1), or None if the prompt was never observed."""
        c = self._counts.get(prompt_id)
        return None if c is None else (c[0] + 0.5) / (c[1] + 1.0)

    # ---- hooks
    def plan(self, requests: list[Request], step: int) -> list[Request]:
        if not requests:
            return requests
        x = self.extreme_pass_rate
        base = np.array([r.n for r in requests], dtype=np.int64)
        est = [self.estimate(r.prompt_id) for r in requests]
        p = np.array([0.5 if e is None else e for e in est], dtype=np.float64)
        extreme = (p <= x + _TOL) | (p >= 1.0 - x - _TOL)
        wanted = base.copy()
        for n in np.unique(base[extreme]).tolist():
            sel = extreme & (base == n)
            wanted[sel] = grown_group_size(p[sel], n, self.target_mixed_probability, self.max_n)
        n0 = self.ctx.group_size
        cap = max(int(base.sum()), math.floor(self.budget * len(requests) * n0 + 1e-9))
        sizes = wanted
        if int(wanted.sum()) > cap:
            sizes = allocate_budget(p, wanted, base, cap)
            self.stats["budget_capped_rounds"] += 1
            self.stats["budget_cut_rollouts"] += int(wanted.sum() - sizes.sum())
        grown = sizes > base
        self.stats["grown_groups"] += int(grown.sum())
        self.stats["extra_rollouts"] += int((sizes - base).sum())
        return [Request(r.prompt_id, int(m)) for r, m in zip(requests, sizes.tolist(), strict=True)]

    def process(self, groups: list[Group], step: int) -> None:
        d = self.estimate_decay
        for g in groups:
            s, t = self._counts.get(g.prompt_id, (0.0, 0.0))
            self._counts[g.prompt_id] = (d * s + float(self.ctx.correctness(g).sum()),
                                         d * t + g.n)

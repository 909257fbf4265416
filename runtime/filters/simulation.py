r"""Simulated RL runs of the ZVE pipeline with Bernoulli rewards (no model, no torch).

A pool of prompts has fixed true pass rates ``p_i`` (the policy does not learn). The
screen's ``sample_fn`` and the step's ``generate`` draw rewards ``~ Bernoulli(p_i)``
(the proxy model's pass rates may differ: ``proxy_pass_rates``); response lengths are
uniform in ``[max_tokens/8, max_tokens]`` so that length shaping has something to break
ties with (no token ids: the repetition penalty cannot be simulated). The run goes over
the surviving prompts for ``epochs`` passes (a final short step included), or stops
after ``max_steps``; the ledger then holds everything the run spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.filters.base import Group, Request
from runtime.filters.ledger import Ledger, rollouts_per_informative_group
from runtime.filters.pipeline import build_pipeline

__all__ = ["SimResult", "simulate"]


@dataclass
class SimResult:
    ledger: Ledger
    report: dict[str, Any]
    steps: int

    @property
    def rollouts_per_informative_group(self) -> float:
        return rollouts_per_informative_group(self.ledger)


def simulate(
    stages: list[dict[str, Any]],
    pass_rates: np.ndarray,
    *,
    group_size: int = 16,
    prompts_per_step: int = 128,
    epochs: int = 1,
    max_steps: int | None = None,
    max_tokens: int = 1024,
    seed: int = 0,
    proxy_pass_rates: np.ndarray | None = None,
) -> SimResult:
    """Run the pipeline built from ``stages`` on simulated rewards (module doc)."""
    p_true = np.asarray(pass_rates, dtype=np.float64)
    p_proxy = p_true if proxy_pass_rates is None else np.asarray(proxy_pass_rates, np.float64)
    rng = np.random.default_rng(seed)
    pipe = build_pipeline(stages, group_size=group_size, max_tokens=max_tokens, seed=seed)

    def sample_fn(ids: list[int], k: int) -> np.ndarray:
        return (rng.random((len(ids), k)) < p_proxy[np.asarray(ids)][:, None]).astype(np.float64)

    def generate(requests: list[Request]) -> list[Group]:
        sizes = np.array([r.n for r in requests])
        probs = np.repeat(p_true[np.array([r.prompt_id for r in requests])], sizes)
        rewards = (rng.random(probs.size) < probs).astype(np.float64)
        lengths = rng.integers(max_tokens // 8, max_tokens + 1, probs.size).astype(np.float64)
        bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        return [Group(r.prompt_id, rewards[a:b], lengths=lengths[a:b])
                for r, a, b in zip(requests, bounds[:-1], bounds[1:], strict=True)]

    prompts = list(range(p_true.size))
    survivors = pipe.screen(prompts, sample_fn).survivors
    source = pipe.stream(survivors, epochs=epochs)
    step = 0
    while max_steps is None or step < max_steps:
        batch = pipe.step(step, source, generate, prompts_per_step)
        if batch.ledger.groups_generated == 0:
            break
        step += 1
    return SimResult(pipe.ledger, pipe.report(), step)

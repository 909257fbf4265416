"""The simulated 245B ladder of ``bench/system_sim.py``: its decode model and that the runtime's
length balancing, fed with the simulated history, never makes the busiest replica slower
than round-robin (fixed seed)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.system_sim import Scale, SimParams, replica_time, sim_lengths, sim_rung


def test_replica_time_continuous_batching() -> None:
    # room for every sequence at once: the longest one sets the time, the others end earlier
    ends = replica_time([(1, 3), (1, 5)], kv_tokens=100, t0=1.0, c=0.5)
    assert ends == pytest.approx([3 * 2.0, 3 * 2.0 + 2 * 1.5])
    # room for one at a time: FIFO, one after the other
    ends = replica_time([(1, 3), (1, 5)], kv_tokens=6, t0=1.0, c=0.5)
    assert ends == pytest.approx([4.5, 4.5 + 7.5])


def test_balancing_never_slower_than_round_robin() -> None:
    # a KV cache of 8 full-length sequences: replicas are bound by their work, not by their
    # longest sequence (when everything runs at once, balancing has nothing to even out)
    sc = Scale(replicas=4, prompts_per_step=64, n=4, max_tokens=4096, max_prompt_tokens=256,
               kv_tokens=8 * 4096)
    prm = SimParams(median_tokens=512.0)
    data = sim_lengths(sc, prm, pool=128, epochs=3, seed=0)
    cfg = {"detok_workers": 1, "overlap": False, "fp8": False, "staleness": 0}
    rr = sim_rung(sc, prm, data, balance=False, **cfg)
    lpt = sim_rung(sc, prm, data, balance=True, **cfg)
    timed = slice(data["steps_per_epoch"], None)  # the predictor has seen every prompt once
    assert all(b <= a * (1 + 1e-9) for a, b in zip(rr["gen"][timed], lpt["gen"][timed],
                                                    strict=True))
    assert np.mean(lpt["idle"][timed]) < np.mean(rr["idle"][timed])

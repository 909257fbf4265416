"""Length-aware balancing across rollout replicas: the length predictor
(``runtime.rollout.length_predictor``), the LPT assignment (``runtime.rollout.balance``) and
the replicas' busy and idle time (``runtime.rollout.replica_time``)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from runtime.rollout.balance import lpt_assign, replica_loads
from runtime.rollout.length_predictor import LengthPredictor
from runtime.rollout.replica_time import RequestLog, busy_seconds, idle_fraction

# --------------------------------------------------------------------------- LPT


@pytest.mark.parametrize("seed", range(20))
def test_lpt_evens_the_predicted_loads(seed: int) -> None:
    """On random work (up to 100× skew), the busiest replica exceeds the least busy by at most
    the largest item; with many items per replica the loads are within 10 % of each other."""
    rng = np.random.default_rng(seed)
    replicas = int(rng.integers(2, 6))
    work = (rng.pareto(1.5, size=int(rng.integers(1, 80))) * 10 + 1).clip(max=100).tolist()
    owner = lpt_assign(work, replicas)
    assert len(owner) == len(work) and set(owner) <= set(range(replicas))
    loads = replica_loads(work, owner, replicas)
    assert sum(loads) == pytest.approx(sum(work))
    assert max(loads) - min(loads) <= max(work) + 1e-9
    assert max(loads) >= sum(work) / replicas  # nothing lost
    if len(work) >= 20 * replicas:
        assert max(loads) / min(loads) <= 1.1


def test_lpt_beats_round_robin_on_a_skewed_step() -> None:
    """Long and short groups alternate: round-robin puts every long one on replica 0; LPT
    gives each replica the same work."""
    work = [100.0, 1.0] * 8
    round_robin = [i % 2 for i in range(len(work))]
    rr = replica_loads(work, round_robin, 2)
    lpt = replica_loads(work, lpt_assign(work, 2), 2)
    assert rr == [800.0, 8.0]
    assert lpt == [404.0, 404.0]


def test_lpt_ties_and_edges() -> None:
    assert lpt_assign([1, 1, 1, 1], 2) == [0, 1, 0, 1]  # ties: request order, lowest replica
    assert lpt_assign([1, 5, 2], 3) == [2, 0, 1]  # longest first
    assert lpt_assign([], 3) == []
    assert lpt_assign([3, 2], 1) == [0, 0]
    with pytest.raises(ValueError, match="at least one replica"):
        lpt_assign([1], 0)


# --------------------------------------------------------------------------- predictor


def test_the_predictor_uses_the_last_group_and_a_running_prior() -> None:
    p = LengthPredictor(max_tokens=64)
    assert p.predict("a") == p.prior == 32  # nothing seen: max_tokens / 2
    p.observe("a", [10, 20])
    assert p.predict("a") == 15
    assert p.predict("b") == 15  # unseen: the mean over all completions so far
    p.observe("b", [1, 1, 1, 1])
    assert p.predict("b") == 1
    assert p.prior == pytest.approx(34 / 6)
    assert p.predict("new") == pytest.approx(34 / 6)
    p.observe("a", [40])  # the last group replaces the earlier one
    assert p.predict("a") == 40
    assert p.prior == pytest.approx(74 / 7)
    p.observe("c", [])  # an empty group teaches nothing
    assert p.predict("c") == p.prior
    with pytest.raises(ValueError, match="max_tokens"):
        LengthPredictor(0)


def test_the_predictor_pickles_with_its_history() -> None:
    p = LengthPredictor(max_tokens=8)
    p.observe(3, [2, 4])
    q = pickle.loads(pickle.dumps(p))
    assert (q.predict(3), q.predict(9), q.max_tokens) == (3, 3, 8)


# --------------------------------------------------------------------------- busy / idle


def test_busy_time_is_the_union_of_the_request_spans() -> None:
    assert busy_seconds([]) == 0
    assert busy_seconds([(0, 2), (1, 3)]) == 3  # overlapping
    assert busy_seconds([(0, 10), (2, 3)]) == 10  # nested
    assert busy_seconds([(5, 6), (0, 1)]) == 2  # disjoint, any order
    log = RequestLog()
    for event in [("a", 0.0, 2.0), ("b", 1.0, 1.5), ("a", 1.0, 4.0), ("a", 6.0, 7.0)]:
        log(*event)
    assert log.busy(["a", "b", "c"]) == [5.0, 0.5, 0.0]
    assert [idle_fraction(b, 10.0) for b in log.busy(["a", "b", "c"])] == [0.5, 0.95, 1.0]
    assert idle_fraction(12.0, 10.0) == 0.0 and idle_fraction(1.0, 0.0) == 0.0

"""Where a rollout request goes when an endpoint fails (``runtime.rollout.failover``), on a
fake clock; the client against live servers and a dead port is in test_rollout.py."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from runtime.rollout.failover import EndpointHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_request_goes_where_it_was_planned_while_that_endpoint_is_up() -> None:
    health = EndpointHealth(3, clock=Clock())
    assert [health.pick(i) for i in range(3)] == [0, 1, 2]


def test_a_down_endpoints_requests_go_to_the_least_busy_live_one() -> None:
    health = EndpointHealth(4, down_s=30, clock=Clock())
    health.failed(1)
    with ExitStack() as busy:
        for i in (2, 2, 3):  # two requests in flight at 2, one at 3, none at 0
            busy.enter_context(health.attempt(i))
        assert health.pick(1) == 0
        busy.enter_context(health.attempt(0))
        busy.enter_context(health.attempt(0))
        assert health.pick(1) == 3  # 0 and 2 have two each, 3 one
    # all idle: ties go to the next endpoint after the planned one, in order
    assert health.pick(1) == 2


def test_a_retry_never_repeats_an_endpoint_while_another_is_left() -> None:
    health = EndpointHealth(3, clock=Clock())
    health.failed(0)
    assert health.pick(0, {0}) == 1
    health.failed(1)
    assert health.pick(0, {0, 1}) == 2
    health.failed(2)  # every endpoint tried and down: the first to come back
    assert health.pick(0, {0, 1, 2}) == 0


def test_a_down_endpoint_is_probed_again_after_its_cool_down_and_an_answer_revives_it() -> None:
    clock = Clock()
    health = EndpointHealth(2, down_s=30, clock=clock)
    health.failed(0)
    assert health.is_down(0) and health.pick(0) == 1
    clock.now += 29.9
    assert health.pick(0) == 1
    clock.now += 0.2  # cool-down over: the planned request probes it
    assert not health.is_down(0) and health.pick(0) == 0
    health.failed(1)
    health.answered(1)  # e.g. a 400: the endpoint is alive
    assert health.pick(1) == 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        EndpointHealth(0)
    with pytest.raises(ValueError):
        EndpointHealth(2, down_s=-1)


def test_concurrent_failovers_spread_over_the_live_endpoints() -> None:
    """Picking and counting are one step: two requests planned for a down endpoint, in flight
    at once, go to two different live ones."""
    health = EndpointHealth(3, clock=Clock())
    health.failed(0)
    with health.attempt(0) as first, health.attempt(0) as second:
        assert {first, second} == {1, 2}
    assert health.pick(0) == 1  # both done: the first after the planned one again

"""The driver's pool of reward workers (``runtime.scoring``): a worker that dies or cannot
start is a JobError, never a hang, and the pool's workers end when it is closed.

The rewards below are built in spawned workers, which import them by name: this module
imports nothing heavy at its top, so that a worker starts fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import JobError
from runtime.rewards import GroupRewards


class _PidReward:
    """Every response's reward is the worker's pid; the prompt "die" ends the worker."""

    reward_range = (0.0, 1.0)

    def group_rewards(self, prompt: str, texts: list[str], reference: str) -> GroupRewards:
        if prompt == "die":
            os._exit(3)  # as a worker killed mid-group: no exception, no result
        return GroupRewards([float(os.getpid())] * len(texts), [1.0] * len(texts))


def pid_reward(config: dict[str, Any]) -> _PidReward:
    """``build_reward`` stand-in (the spawned workers import it from this module)."""
    return _PidReward()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime.policy import build_tokenizer, save_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(build_tokenizer(64), path)
    return path


def test_a_worker_that_dies_is_a_job_error_and_close_ends_the_workers(
        tokenizer_dir: Path) -> None:
    from runtime.processes import pid_alive
    from runtime.scoring import ScoringPool

    ids = [[10, 11, 12]]
    with ScoringPool(2, str(tokenizer_dir), {}, build_reward=pid_reward) as pool:
        pool.wait_ready(timeout=300)
        assert len(pool.pids) == 2 and all(pid_alive(p) for p in pool.pids)
        got = pool.result(pool.submit("fine", ids, ""))
        assert int(got.rewards[0]) in pool.pids  # scored in a worker, not here
        dying = pool.submit("die", ids, "")
        with pytest.raises(JobError, match=r"a reward worker died \(system\.reward_workers = 2\)"):
            pool.result(dying)
        with pytest.raises(JobError, match="a reward worker died"):  # the pool stays broken
            pool.result(pool.submit("fine", ids, ""))
    assert not any(pid_alive(p) for p in pool.pids)


def test_a_worker_that_cannot_build_its_tokenizer_is_a_job_error(tmp_path: Path) -> None:
    from runtime.scoring import ScoringPool

    with ScoringPool(2, str(tmp_path / "no-such-policy"), {}, build_reward=pid_reward) as pool, \
            pytest.raises(JobError, match="a reward worker died"):
        pool.wait_ready(timeout=300)


def test_one_worker_is_the_drivers_thread_not_a_pool() -> None:
    from runtime.scoring import ScoringPool

    with pytest.raises(ValueError, match="2 or more workers"):
        ScoringPool(1, "unused", {})

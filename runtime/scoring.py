r"""The driver's pool of reward workers: processes that detokenize and score rollout groups.

``system.reward_workers`` = W. W = 1: no pool; the driver decodes and scores every group in
its own thread (``runtime.generation``). W > 1: a :class:`ScoringPool` of W processes
started with the *spawn* method (the driver has threads — the generation requests, the
HTTP client — and a fork after threads may copy a lock that some thread holds). Each worker
builds the tokenizer (``AutoTokenizer.from_pretrained`` of the policy's HF folder, as the
driver does) and the reward (``runtime.rewards.build_reward`` of the spec's ``reward``
section) once, in its initializer, from plain data. Per group, a worker computes what the
driver's thread computes at W = 1::

    texts   = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    rewards, scores = reward.group_rewards(prompt, texts, reference)

The driver submits a group as soon as its chunk's completions arrive, so groups are decoded
and scored in parallel with each other and with the generation of the other chunks, and it
puts each result at its group's index: the same rewards in the same order as W = 1. A
step's scoring then costs about Σ_groups cost / W of driver time instead of Σ cost (plus
the pickling of the token ids), and with ``reward_overlap`` it hides behind generation.

Judge counters: an ``http`` judge counts its calls and parse failures in the worker that
called it; each result carries that group's counts and :meth:`ScoringPool.result` adds them
to the driver's reward (``RewardComposer.add_judge_counts``), so the driver's per-step
``judge_step`` check sees every call. A worker runs one group at a time, so the counts of a
group are exact.

Failures: an exception raised by the reward in a worker (a ``JudgeError``, …) is raised in
the driver as is. A worker that dies (killed, out of memory, ``os._exit``) or whose
initializer fails breaks the pool: the group it ran, every pending group and every later
submit raise a :class:`JobError` naming the cause — never a hang. The driver makes the pool
once per run and shuts it down when it ends, on an error too; a worker also dies with the
driver process (``runtime.processes.die_with_parent``).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from runtime.errors import JobError

__all__ = ["ScoringPool"]

# One worker's tokenizer and reward, built by _init (module globals: one of each per process).
_tokenizer: Any = None
_reward: Any = None


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _init(tokenizer_path: str, reward_config: dict[str, Any],
          build_reward: Callable[[dict[str, Any]], Any]) -> None:
    global _tokenizer, _reward
    from runtime.processes import die_with_parent

    die_with_parent()  # no orphans when the driver is killed
    _tokenizer = _load_tokenizer(tokenizer_path)
    _reward = build_reward(reward_config)


def _ready() -> None:
    """A no-op: returns once a worker has run its initializer."""


def _score(prompt: str, completions: Sequence[Sequence[int]],
           reference: str) -> tuple[Any, dict[str, int]]:
    """(GroupRewards, the judge's counts over this group) in a worker (module doc)."""
    counters = getattr(_reward, "judge_counters", None)
    before = counters() if callable(counters) else {}
    texts = [_tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    got = _reward.group_rewards(prompt, texts, reference)
    after = counters() if callable(counters) else {}
    return got, {k: v - before.get(k, 0) for k, v in after.items()}


class ScoringPool:
    """W worker processes that decode and score groups (module doc). ``tokenizer_path``: the
    policy's HF folder; ``reward_config``: the spec's ``reward`` section; ``build_reward``: a
    module-level function (spawned workers import it by name) from that section to a reward
    with ``group_rewards``."""

    def __init__(self, workers: int, tokenizer_path: str, reward_config: dict[str, Any], *,
                 build_reward: Callable[[dict[str, Any]], Any] | None = None) -> None:
        if workers < 2:
            raise ValueError("a scoring pool needs 2 or more workers (1: the driver's thread)")
        if build_reward is None:
            from runtime.rewards import build_reward
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init, initargs=(str(tokenizer_path), reward_config, build_reward))
        # W tasks at once start the W processes now, from this thread (a worker's
        # PR_SET_PDEATHSIG follows the thread that started it): their start-up overlaps the
        # engines' and its failures show in wait_ready, not in the first step.
        self._warmup = [self._pool.submit(_ready) for _ in range(workers)]
        # ProcessPoolExecutor keeps its processes by pid; they are all started by now
        self.pids: list[int] = list(self._pool._processes or {})

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has built its tokenizer and reward; a JobError if one
        could not, or if ``timeout`` seconds pass first."""
        done, pending = wait(self._warmup, timeout=timeout)
        if pending:
            raise JobError(f"the {self.workers} reward workers (system.reward_workers) did not "
                           f"start within {timeout:g} s")
        for fut in done:
            self._unwrap(fut)

    def submit(self, prompt: str, completions: Sequence[Sequence[int]],
               reference: str) -> Future[Any]:
        """Decode and score one group (its completions' token ids) in a worker."""
        try:
            return self._pool.submit(_score, prompt, completions, reference)
        except BrokenProcessPool as e:
            raise self._broken(e) from e

    def result(self, future: Future[Any], reward: Any = None) -> Any:
        """The ``GroupRewards`` of a submitted group (waits for it); its judge counts go to
        ``reward`` (the driver's, ``add_judge_counts``) when given."""
        got, counts = self._unwrap(future)
        add = getattr(reward, "add_judge_counts", None)
        if counts and callable(add):
            add(counts)
        return got

    def close(self) -> None:
        """Stop the workers (pending groups are cancelled)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unwrap(self, future: Future[Any]) -> Any:
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise self._broken(e) from e

    def _broken(self, e: BaseException) -> JobError:
        return JobError(f"a reward worker died (system.reward_workers = {self.workers}): {e} "
                        "(its traceback, if it left one, is in the driver's log above)")

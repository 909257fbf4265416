r"""Reward composition from the spec's ``reward`` section.

Config (the spec's ``reward`` section as a plain dict)::

    {"verifiers": [{"type": "arithmetic" | "math", "weight": 1.0, ...}, ...],
     "judge": None | {"type": "rule" | "http", "url": ..., "model": ...,
                      "api_key_env": ..., "tie_margin": 0.0, "timeout_s": 60.0,
                      "retries": 2, "max_parse_failure_rate": 0.1}}

Per response (weights normalised, w_i > 0)::

    score = Σ_i w_i · s_i(prompt, response, reference) / Σ_i w_i        ∈ [0, 1]

Per group:

* no judge: ``rewards = scores``; reward range [0, 1].
* with a judge: ``rewards = pairwise_rewards(prompt, responses, judge, reference)``, i.e.
  (wins − losses)/(G − 1) over all unordered pairs with ties counting 0; reward range
  [−1, 1]. The ``rule`` judge compares the weighted scores above with ``tie_margin``;
  the ``http`` judge asks an LLM (the scores are still computed and returned), judging
  the G(G − 1)/2 pairs of a group in 8 threads.

:meth:`RewardComposer.group_rewards` returns both ``rewards`` (what the advantage is
computed from) and ``scores`` (the verifier scores: correctness). The ZVE pipeline
uses the scores to tell an all-correct flat group from an all-wrong one even when the
rewards are pairwise (all ties → all 0), e.g. for reward shaping's ``all_correct`` scope
and the RL-ZVP sign.

An unreadable reply of the ``http`` judge counts as a tie. :meth:`RewardComposer.judge_step`
gives the calls and parse failures since a snapshot of :meth:`~RewardComposer.judge_counters`
(the RL driver logs them per step) and raises :class:`JudgeError` when the failures exceed
``max_parse_failure_rate`` of the calls: a broken judge must not silently turn every group
into ties. Extra keys of a verifier entry are passed to its constructor
(e.g. ``rel_tol`` of ``math``); unknown keys of the judge raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime.rewards.arithmetic import ArithmeticVerifier
from runtime.rewards.base import Judge, Verifier
from runtime.rewards.http_judge import HTTPJudge, JudgeError
from runtime.rewards.math_verifier import MathVerifier
from runtime.rewards.pairwise import pairwise_rewards
from runtime.rewards.rule_judge import RuleJudge

__all__ = ["VERIFIERS", "GroupRewards", "RewardComposer", "build_reward"]

VERIFIERS: dict[str, type] = {"arithmetic": ArithmeticVerifier, "math": MathVerifier}
_JUDGE_KEYS = {"type", "url", "model", "api_key_env", "tie_margin", "timeout_s", "retries",
               "max_parse_failure_rate"}


@dataclass(frozen=True)
class GroupRewards:
    """Rewards of one group (advantage input) and the verifier scores (correctness)."""

    rewards: list[float]
    scores: list[float]


class RewardComposer:
    """Weighted verifiers, optionally turned into tie-aware pairwise rewards by a judge."""

    def __init__(
        self,
        verifiers: Sequence[tuple[Verifier, float]],
        judge: Judge | None = None,
        *,
        judge_workers: int = 1,
    ) -> None:
        if not verifiers:
            raise ValueError("reward needs at least one verifier")
        if any(w <= 0 for _, w in verifiers):
            raise ValueError("verifier weights must be > 0")
        total = float(sum(w for _, w in verifiers))
        self.verifiers = [(v, float(w) / total) for v, w in verifiers]
        self.judge = judge
        self.judge_workers = judge_workers
        self.max_parse_failure_rate = 1.0  # build_reward sets the spec's for an http judge

    @property
    def reward_range(self) -> tuple[float, float]:
        """(reward_min, reward_max) of the group rewards: (0, 1), or (−1, 1) with a judge."""
        return (-1.0, 1.0) if self.judge is not None else (0.0, 1.0)

    def judge_counters(self) -> dict[str, int]:
        """The judge's running counters (``calls``, ``parse_failures``, …); empty when the
        judge keeps none (rule judge, or no judge)."""
        stats = getattr(self.judge, "stats", None)
        return dict(stats()) if callable(stats) else {}

    def add_judge_counts(self, counts: dict[str, int]) -> None:
        """Add the counters of a copy of this reward's judge (in a reward worker,
        ``runtime.scoring``) to the judge's, so that :meth:`judge_step` sees its calls."""
        add = getattr(self.judge, "add_stats", None)
        if callable(add):
            add(counts)

    def judge_step(self, since: dict[str, int]) -> dict[str, int]:
        """``judge_calls`` and ``judge_parse_failures`` since the counters ``since``; a
        JudgeError when the failures are more than ``max_parse_failure_rate`` of the calls."""
        now = self.judge_counters()
        if not now:
            return {}
        calls = now.get("calls", 0) - since.get("calls", 0)
        failures = now.get("parse_failures", 0) - since.get("parse_failures", 0)
        if calls and failures > self.max_parse_failure_rate * calls:
            where = getattr(self.judge, "endpoint", "the judge")
            raise JudgeError(
                f"{failures} of {calls} replies of the judge at {where} ({failures / calls:.0%}) "
                f"were not A, B or TIE, more than reward.judge.max_parse_failure_rate = "
                f"{self.max_parse_failure_rate:g} (each counted as a tie): check the judge's "
                "url, model and replies, or raise the threshold")
        return {"judge_calls": calls, "judge_parse_failures": failures}

    def score(self, prompt: str, response: str, reference: str) -> float:
        """Weighted mean of the verifier scores, in [0, 1]."""
        return sum(w * float(v.score(prompt, response, reference)) for v, w in self.verifiers)

    def group_rewards(
        self, prompt: str, responses: Sequence[str], reference: str
    ) -> GroupRewards:
        """Rewards and scores of a group of responses to one prompt."""
        scores = [self.score(prompt, r, reference) for r in responses]
        if self.judge is None:
            return GroupRewards(rewards=list(scores), scores=scores)
        rewards = pairwise_rewards(prompt, responses, self.judge, reference,
                                   max_workers=self.judge_workers)
        return GroupRewards(rewards=rewards, scores=scores)


def build_reward(config: dict[str, Any]) -> RewardComposer:
    """A :class:`RewardComposer` from the spec's ``reward`` section (see module doc)."""
    unknown = set(config) - {"verifiers", "judge"}
    if unknown:
        raise ValueError(f"unknown reward keys: {sorted(unknown)}")
    verifiers: list[tuple[Verifier, float]] = []
    for entry in config.get("verifiers") or []:
        params = dict(entry)
        kind = params.pop("type", None)
        weight = float(params.pop("weight", 1.0))
        if kind not in VERIFIERS:
            raise ValueError(f"unknown verifier type {kind!r}; known: {sorted(VERIFIERS)}")
        verifiers.append((VERIFIERS[kind](**params), weight))
    composer = RewardComposer(verifiers)
    jcfg = config.get("judge")
    if jcfg:
        unknown = set(jcfg) - _JUDGE_KEYS
        if unknown:
            raise ValueError(f"unknown judge keys: {sorted(unknown)}")
        kind = jcfg.get("type")
        if kind == "rule":
            composer.judge = RuleJudge(composer, tie_margin=float(jcfg.get("tie_margin") or 0.0))
        elif kind == "http":
            if not jcfg.get("url") or not jcfg.get("model"):
                raise ValueError("an http judge needs url and model")
            composer.judge = HTTPJudge(
                jcfg["url"],
                jcfg["model"],
                jcfg.get("api_key_env"),
                timeout_s=float(jcfg.get("timeout_s") or 60.0),
                retries=int(jcfg.get("retries", 2)),
            )
            composer.judge_workers = 8
            composer.max_parse_failure_rate = float(jcfg.get("max_parse_failure_rate", 0.1))
        else:
            raise ValueError(f"unknown judge type {kind!r}; known: ['http', 'rule']")
    return composer

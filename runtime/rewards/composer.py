r"""Reward composition from the spec's ``reward`` section.

Config (the spec's ``reward`` section as a plain dict)::

    {"verifiers": [{"type": "arithmetic" | "math", "weight": 1.0, ...}, ...],
     "judge": None | {"type": "rule" | "http", "url": ..., "model": ...,
                      "api_key_env": ..., "tie_margin": 0.0, "timeout_s": 60.0,
                      "retries": 2}}

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
and the RL-ZVP sign. Extra keys of a verifier entry are passed to its constructor
(e.g. ``rel_tol`` of ``math``); unknown keys of the judge raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime.rewards.arithmetic import ArithmeticVerifier
from runtime.rewards.base import Judge, Verifier
from runtime.rewards.http_judge import HTTPJudge
from runtime.rewards.math_verifier import MathVerifier
from runtime.rewards.pairwise import pairwise_rewards
from runtime.rewards.rule_judge import RuleJudge

__all__ = ["VERIFIERS", "GroupRewards", "RewardComposer", "build_reward"]

VERIFIERS: dict[str, type] = {"arithmetic": ArithmeticVerifier, "math": MathVerifier}
_JUDGE_KEYS = {"type", "url", "model", "api_key_env", "tie_margin", "timeout_s", "retries"}


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

    @property
    def reward_range(self) -> tuple[float, float]:
        """(reward_min, reward_max) of the group rewards: (0, 1), or (−1, 1) with a judge."""
        return (-1.0, 1.0) if self.judge is not None else (0.0, 1.0)

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
        else:
            raise ValueError(f"unknown judge type {kind!r}; known: ['http', 'rule']")
    return composer

r"""Rule judge: ternary verdict from verifier scores with a tie margin.

With ``s(x)`` the score of response x (any object with ``score(prompt, response,
reference)``, e.g. a verifier or the weighted :class:`RewardComposer`)::

    BETTER  if s(a) − s(b) >  tie_margin
    WORSE   if s(b) − s(a) >  tie_margin
    TIE     otherwise (|s(a) − s(b)| ≤ tie_margin)

Scores are cached per (prompt, response, reference) (at most ~4096 entries), since every
response takes part in G − 1 comparisons.
"""

from __future__ import annotations

from runtime.rewards.base import Verdict, Verifier

__all__ = ["RuleJudge"]


class RuleJudge:
    """Compares verifier scores; differences within ``tie_margin`` are ties."""

    def __init__(self, scorer: Verifier, tie_margin: float = 0.0) -> None:
        if tie_margin < 0:
            raise ValueError("tie_margin must be ≥ 0")
        self.scorer = scorer
        self.tie_margin = float(tie_margin)
        self._cache: dict[tuple[str, str, str], float] = {}

    def _score(self, prompt: str, response: str, reference: str) -> float:
        key = (prompt, response, reference)
        value = self._cache.get(key)
        if value is None:
            value = float(self.scorer.score(prompt, response, reference))
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = value
        return value

    def compare(
        self, prompt: str, response_a: str, response_b: str, reference: str | None = None
    ) -> Verdict:
        ref = reference or ""
        d = self._score(prompt, response_a, ref) - self._score(prompt, response_b, ref)
        if d > self.tie_margin:
            return Verdict.BETTER
        if -d > self.tie_margin:
            return Verdict.WORSE
        return Verdict.TIE

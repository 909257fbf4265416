"""Common interfaces of reward functions: verifiers, ternary verdicts, pairwise judges.

* A :class:`Verifier` scores one response against a reference answer:
  ``score(prompt, response, reference) -> float`` in [0, 1].
* A :class:`Judge` compares two responses to the same prompt:
  ``compare(prompt, response_a, response_b, reference=None) -> Verdict`` where the
  verdict is about ``a`` relative to ``b`` (BETTER: a is better than b). The optional
  ``reference`` lets rule judges score against the reference answer and LLM judges show
  it; a judge must accept calls without it.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

__all__ = ["Judge", "Verdict", "Verifier"]


class Verdict(enum.Enum):
    """Ternary verdict of response a against response b."""

    BETTER = 1
    TIE = 0
    WORSE = -1

    def flipped(self) -> Verdict:
        """The verdict of b against a."""
        return Verdict(-self.value)


@runtime_checkable
class Verifier(Protocol):
    """Rule-based scorer of one response."""

    def score(self, prompt: str, response: str, reference: str) -> float:
        """A score in [0, 1] (1 = correct)."""
        ...


@runtime_checkable
class Judge(Protocol):
    """Pairwise judge: ternary verdict of ``response_a`` against ``response_b``."""

    def compare(
        self, prompt: str, response_a: str, response_b: str, reference: str | None = None
    ) -> Verdict:
        """BETTER if a is better than b, WORSE if worse, TIE otherwise."""
        ...

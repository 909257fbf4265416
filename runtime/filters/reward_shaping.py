r"""Stage 3 — reward shaping: length and repetition penalties break ties.

For every response i of a group in scope::

    r_i ← r_i − c_len · L_i / L_max − c_rep · rep_n(tokens_i)

with ``L_i`` the response length in tokens, ``L_max`` = ``length.max_tokens`` or the
rollout's ``max_tokens``, and the repeated n-gram fraction::

    rep_n(x) = (#n-gram occurrences − #distinct n-grams) / #n-gram occurrences
             = share of the n-grams of x that repeat an earlier one   (0 if |x| < n)

Scope: ``all_correct`` shapes only groups whose responses are all correct (verifier
scores, or raw rewards at the reward maximum) — among equally correct answers the
shorter, less repetitive one is preferred; ``all`` shapes every group.

A group that is still flat after shaping (all penalties equal) keeps its unshaped
rewards: subtracting a common constant carries no signal, and the RL-ZVP stage must
still see an all-correct group at the reward maximum. Lengths come from
``Group.lengths`` or ``len(token_ids[i])``; a penalty with a non-zero coefficient and no
data to compute it raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from runtime.filters.base import FLAT_TOL, Group, Stage, is_flat

__all__ = ["RewardShaping", "repeated_ngram_fraction"]


def repeated_ngram_fraction(tokens: Sequence[int], n: int) -> float:
    """Share of the n-grams of ``tokens`` that repeat an earlier one (0 when |tokens| < n)."""
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    seq = list(tokens)
    grams = set(zip(*(seq[i : i + total] for i in range(n)), strict=True))
    return (total - len(grams)) / total


def _params(value: Mapping[str, Any] | None, defaults: dict[str, Any], name: str) -> dict:
    out = dict(defaults)
    if value is None:
        return out
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    unknown = set(value) - set(defaults)
    if unknown:
        raise ValueError(f"reward_shaping.{name}: unknown keys {sorted(unknown)}")
    out.update(value)
    return out


class RewardShaping(Stage):
    """Length / repetition penalties inside (all-correct) groups."""

    type = "reward_shaping"

    def __init__(
        self,
        scope: Literal["all_correct", "all"] = "all_correct",
        length: Mapping[str, Any] | None = None,
        repetition: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if scope not in ("all_correct", "all"):
            raise ValueError(f"reward_shaping.scope must be all_correct or all, got {scope!r}")
        ln = _params(length, {"coefficient": 0.0, "max_tokens": None}, "length")
        rp = _params(repetition, {"ngram": 4, "coefficient": 0.0}, "repetition")
        if ln["coefficient"] < 0 or rp["coefficient"] < 0 or rp["ngram"] < 1:
            raise ValueError("penalty coefficients must be ≥ 0 and ngram ≥ 1")
        self.scope = scope
        self.length_coefficient = float(ln["coefficient"])
        self.length_max_tokens = None if ln["max_tokens"] is None else int(ln["max_tokens"])
        self.repetition_ngram = int(rp["ngram"])
        self.repetition_coefficient = float(rp["coefficient"])

    def params(self) -> dict[str, Any]:
        return {"scope": self.scope,
                "length": {"coefficient": self.length_coefficient,
                           "max_tokens": self.length_max_tokens},
                "repetition": {"ngram": self.repetition_ngram,
                               "coefficient": self.repetition_coefficient}}

    def penalty(self, group: Group) -> np.ndarray:
        """The per-response penalty (module doc)."""
        pen = np.zeros(group.n)
        if self.length_coefficient > 0:
            max_tokens = self.length_max_tokens or self.ctx.max_tokens
            if not max_tokens:
                raise ValueError("reward_shaping.length needs max_tokens (or rollout max_tokens)")
            if group.lengths is not None:
                lengths = group.lengths
            elif group.token_ids is not None:
                lengths = np.array([len(t) for t in group.token_ids], dtype=np.float64)
            else:
                raise ValueError("reward_shaping.length needs Group.lengths or token_ids")
            pen += self.length_coefficient * lengths / max_tokens
        if self.repetition_coefficient > 0:
            if group.token_ids is None:
                raise ValueError("reward_shaping.repetition needs Group.token_ids")
            n = self.repetition_ngram
            pen += self.repetition_coefficient * np.array(
                [repeated_ngram_fraction(t, n) for t in group.token_ids])
        return pen

    def in_scope(self, group: Group) -> bool:
        if self.scope == "all":
            return True
        return float(self.ctx.correctness(group).min()) >= 1.0 - FLAT_TOL

    def process(self, groups: list[Group], step: int) -> None:
        if self.length_coefficient == 0 and self.repetition_coefficient == 0:
            return
        for g in groups:
            if g.n == 0 or not self.in_scope(g):
                continue
            shaped = g.rewards - self.penalty(g)
            self.stats["groups_shaped"] += 1
            if is_flat(shaped):
                self.stats["still_flat"] += 1  # keeps its unshaped rewards
                continue
            if g.flat:
                self.stats["ties_broken"] += 1
                self.stats["rollouts_rescued"] += g.n
            g.rewards = shaped
            g.flat = False

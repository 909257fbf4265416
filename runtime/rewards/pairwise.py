r"""Tie-aware pairwise rewards inside a group (the "advantage inversion" fix, DESIGN.md §4).

A scalar reward model's scores near the group mean are noisy; z-scoring a group of
near-ties turns that noise into ±1 advantages of arbitrary sign. Instead a judge gives a
ternary verdict for every unordered pair of the group and::

    reward_i = (wins_i − losses_i) / (G − 1)        ∈ [−1, 1]

ties contribute nothing, so near-equal responses get near-equal (often identical)
rewards, and an all-tie group is flat (all rewards 0).

Each unordered pair {i, j} (i < j) is judged exactly once and the verdict is used
antisymmetrically (a win of i is a loss of j), so Σ_i reward_i = 0. Against position
bias of LLM judges the presentation order alternates (``swap_positions``): pairs with
``(i + j)`` odd are shown as (j, i) and the verdict is flipped back. A group of one
response gets reward 0. ``max_workers > 1`` judges pairs concurrently in threads (for
HTTP judges); the result does not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from runtime.rewards.base import Judge, Verdict

__all__ = ["pairwise_rewards"]


def pairwise_rewards(
    prompt: str,
    responses: Sequence[str],
    judge: Judge,
    reference: str | None = None,
    *,
    swap_positions: bool = True,
    max_workers: int = 1,
) -> list[float]:
    """``(wins − losses)/(G − 1)`` per response over all unordered pairs; ties count 0."""
    G = len(responses)
    if G < 2:
        return [0.0] * G
    pairs = [(i, j) for i in range(G) for j in range(i + 1, G)]

    def judge_pair(pair: tuple[int, int]) -> Verdict:
        i, j = pair
        if swap_positions and (i + j) % 2 == 1:
            return judge.compare(prompt, responses[j], responses[i], reference).flipped()
        return judge.compare(prompt, responses[i], responses[j], reference)

    if max_workers > 1:
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            verdicts = list(pool.map(judge_pair, pairs))
    else:
        verdicts = [judge_pair(p) for p in pairs]
    score = [0] * G
    for (i, j), v in zip(pairs, verdicts, strict=True):
        score[i] += v.value
        score[j] -= v.value
    return [s / (G - 1) for s in score]

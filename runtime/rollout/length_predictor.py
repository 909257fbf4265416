"""How long a prompt's completions will be: the prediction that balances rollout replicas.

Rule::

    predicted length of prompt p = mean token length of the completions of p's last group
                                   in this run
    a prompt not seen yet        = the prior: the mean length over every completion seen so
                                   far in this run, or max_tokens / 2 before the first

The predictor is plain data: the RL driver keeps it in its state, which is pickled after
every step, so a resumed run predicts what the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["LengthPredictor"]


class LengthPredictor:
    """Per-prompt mean length of the last group, and the running mean over all completions."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self.last: dict[Hashable, float] = {}
        self.tokens = 0
        self.completions = 0

    def observe(self, prompt_id: Hashable, lengths: Sequence[int]) -> None:
        """Record one group of ``prompt_id``: the token lengths of its completions."""
        if not lengths:
            return
        self.last[prompt_id] = sum(lengths) / len(lengths)
        self.tokens += int(sum(lengths))
        self.completions += len(lengths)

    @property
    def prior(self) -> float:
        """The prediction for a prompt not seen yet."""
        return self.tokens / self.completions if self.completions else self.max_tokens / 2

    def predict(self, prompt_id: Hashable) -> float:
        return self.last.get(prompt_id, self.prior)

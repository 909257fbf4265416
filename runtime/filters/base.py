"""Common types of the zero-variance elimination (ZVE) stages: groups, requests, stages.

A ZVE stage is one small class with a ``type`` (the spec's ``filters[*].type``) whose
constructor takes the spec's parameters as keywords. The :class:`~runtime.filters.pipeline.Pipeline`
calls the hooks below in the order the spec lists the stages; each hook defaults to a
no-op, so a stage implements only the phases it acts in:

* ``admit(prompt_id, step) -> bool``      select phase: may this prompt be sampled now?
* ``inject(step, k) -> list[prompt_id]``  select phase: prompts to retry first (≤ k)
* ``plan(requests, step) -> requests``    select phase: choose each prompt's group size
* ``process(groups, step)``               after reward: shape rewards, mark flat groups,
                                          record history (mutates the groups in place)
* ``report() -> dict``                    what it removed and the rollouts it spent

Zero variance: a group is *flat* when ``max r − min r ≤ FLAT_TOL · max(1, |r|_max)``
(the rule and constant of ``runtime.advantages``; this package needs numpy only).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np

__all__ = [
    "FLAT_TOL",
    "Context",
    "Group",
    "PromptId",
    "Request",
    "Stage",
    "Status",
    "is_flat",
]

#: Relative tolerance of the zero-variance test (same as ``runtime.advantages.FLAT_TOL``).
FLAT_TOL = 1e-9

PromptId = Hashable
#: used: informative group in the batch; reshaped: flat group in the batch with RL-ZVP
#: token advantages; kept_flat: flat group in the batch with A = 0; dropped: flat group
#: not trained on; discarded: informative over-sample not needed to fill the batch.
Status = Literal["used", "reshaped", "kept_flat", "dropped", "discarded"]
IN_BATCH: frozenset[str] = frozenset({"used", "reshaped", "kept_flat"})


def is_flat(rewards: np.ndarray) -> bool:
    """True when all rewards of a group are equal (see module doc)."""
    if rewards.size < 2:
        return True
    hi = float(rewards.max())
    lo = float(rewards.min())
    return hi - lo <= FLAT_TOL * max(1.0, abs(hi), abs(lo))


class Request(NamedTuple):
    """Sample ``n`` responses to prompt ``prompt_id``."""

    prompt_id: PromptId
    n: int


@dataclass(eq=False)
class Group:
    """The responses sampled for one prompt, as the ZVE stages see them.

    ``rewards`` is what the advantage is computed from (reward shaping may change it;
    ``raw_rewards`` keeps the original). ``scores`` are optional verifier scores in
    [0, 1] (correctness) when they differ from the rewards (pairwise judge rewards);
    without them correctness is read from the raw rewards and the reward range.
    ``lengths`` (tokens) and ``token_ids`` feed reward shaping; ``payload`` carries
    whatever the driver needs back (responses, log-probs) untouched.
    The pipeline fills ``flat``, ``status``, ``zvp_sign``, ``step`` and ``round``.
    """

    prompt_id: PromptId
    rewards: np.ndarray
    lengths: np.ndarray | None = None
    token_ids: Sequence[Sequence[int]] | None = None
    scores: np.ndarray | None = None
    payload: Any = None
    raw_rewards: np.ndarray = field(init=False, repr=False)
    flat: bool = False
    status: Status = "used"
    zvp_sign: int = 0
    step: int = -1
    round: int = 0

    def __post_init__(self) -> None:
        self.rewards = np.asarray(self.rewards, dtype=np.float64).reshape(-1)
        self.raw_rewards = self.rewards.copy()
        if self.lengths is not None:
            self.lengths = np.asarray(self.lengths, dtype=np.float64).reshape(-1)
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        for name in ("lengths", "scores", "token_ids"):
            v = getattr(self, name)
            if v is not None and len(v) != self.rewards.size:
                raise ValueError(f"group {self.prompt_id!r}: {name} has {len(v)} entries, "
                                 f"rewards {self.rewards.size}")
        self.flat = is_flat(self.rewards)

    @property
    def n(self) -> int:
        return int(self.rewards.size)


@dataclass(frozen=True)
class Context:
    """What every stage may read: the run's base group size, max tokens, reward range."""

    group_size: int
    max_tokens: int | None = None
    reward_min: float = 0.0
    reward_max: float = 1.0
    seed: int = 0

    def correctness(self, group: Group) -> np.ndarray:
        """Per-response correctness in [0, 1]: the scores, or the raw rewards rescaled."""
        if group.scores is not None:
            return group.scores
        span = self.reward_max - self.reward_min
        return np.clip((group.raw_rewards - self.reward_min) / span, 0.0, 1.0)

    def zvp_sign(self, group: Group) -> int:
        """+1 all correct, −1 all wrong, 0 otherwise (the RL-ZVP branch of a flat group)."""
        c = self.correctness(group)
        if c.size == 0:
            return 0
        if float(c.min()) >= 1.0 - FLAT_TOL:
            return 1
        if float(c.max()) <= FLAT_TOL:
            return -1
        return 0


class Stage:
    """Base class of a ZVE stage (see module doc); hooks default to no-ops."""

    type: ClassVar[str] = ""

    def __init__(self) -> None:
        self.ctx = Context(group_size=1)
        self.stats: Counter[str] = Counter()

    def bind(self, ctx: Context) -> None:
        """Called once by the pipeline before use."""
        self.ctx = ctx

    def admit(self, prompt_id: PromptId, step: int) -> bool:
        return True

    def inject(self, step: int, k: int) -> list[PromptId]:
        return []

    def plan(self, requests: list[Request], step: int) -> list[Request]:
        return requests

    def process(self, groups: list[Group], step: int) -> None:
        return None

    def params(self) -> dict[str, Any]:
        """The constructor parameters (for reports)."""
        return {}

    def report(self) -> dict[str, Any]:
        return {"type": self.type, **self.params(), **dict(self.stats)}

r"""Stage 5 — history: skip prompts that keep producing flat groups.

Every group that reaches this stage is a *visit* of its prompt; the stage records
whether it was flat as it arrives here (so after reward shaping when shaping is
listed earlier, before it otherwise). Rule::

    the last `window` visits of prompt q were all flat, the last one at step s
        ⇒ q is skipped at steps s+1 … s+cooldown_steps and retried from s+cooldown_steps+1

A prompt drawn from the prompt source while it cools is not lost: it is deferred and
re-offered (before fresh prompts) at the first selection after its cooldown ends. A
retried prompt that is flat again starts another cooldown at once (its last `window`
visits are still all flat); one informative visit clears it. Costs no rollouts; it
reports the visits it skipped, the cooldowns it started and the prompts it retried.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Any

from runtime.filters.base import Group, PromptId, Stage

__all__ = ["History"]


class History(Stage):
    """Skip prompts flat in their last ``window`` visits for ``cooldown_steps`` steps."""

    type = "history"

    def __init__(self, window: int = 2, cooldown_steps: int = 20) -> None:
        super().__init__()
        if window < 1 or cooldown_steps < 1:
            raise ValueError("history.window and cooldown_steps must be ≥ 1")
        self.window = int(window)
        self.cooldown_steps = int(cooldown_steps)
        self._visits: dict[PromptId, deque[bool]] = {}
        self._until: dict[PromptId, int] = {}  # last step of the cooldown
        self._deferred: list[tuple[int, int, PromptId]] = []  # heap (until, seq, prompt)
        self._in_deferred: set[PromptId] = set()
        self._seq = itertools.count()

    def params(self) -> dict[str, Any]:
        return {"window": self.window, "cooldown_steps": self.cooldown_steps}

    def cooling(self, prompt_id: PromptId, step: int) -> bool:
        """Whether the prompt is skipped at ``step``."""
        until = self._until.get(prompt_id)
        return until is not None and step <= until

    def admit(self, prompt_id: PromptId, step: int) -> bool:
        if not self.cooling(prompt_id, step):
            return True
        self.stats["skipped"] += 1
        if prompt_id not in self._in_deferred:
            self._in_deferred.add(prompt_id)
            heapq.heappush(self._deferred, (self._until[prompt_id], next(self._seq), prompt_id))
        return False

    def inject(self, step: int, k: int) -> list[PromptId]:
        out: list[PromptId] = []
        while self._deferred and len(out) < k and self._deferred[0][0] < step:
            _, _, pid = heapq.heappop(self._deferred)
            self._in_deferred.discard(pid)
            out.append(pid)
        self.stats["retried"] += len(out)
        return out

    def process(self, groups: list[Group], step: int) -> None:
        for g in groups:
            visits = self._visits.get(g.prompt_id)
            if visits is None:
                visits = self._visits[g.prompt_id] = deque(maxlen=self.window)
            visits.append(g.flat)
            self.stats["flat_visits"] += int(g.flat)
            if g.flat and len(visits) == self.window and all(visits):
                self._until[g.prompt_id] = step + self.cooldown_steps
                self.stats["cooldowns"] += 1

    @property
    def deferred(self) -> int:
        """Prompts waiting for the end of their cooldown."""
        return len(self._deferred)

r"""Stage 4 — online handling of groups still flat after reward (and shaping).

``action``:

* ``rl_zvp`` — keep the rollouts and reshape: the group trains with RL-ZVP token
  advantages (``runtime.advantages.rl_zvp_token_advantages``), sign +1 when all
  responses are correct, −1 when all are wrong (status ``reshaped``). A flat group at a
  reward strictly between (partial credit) has no RL-ZVP branch: it is kept with A = 0
  (status ``kept_flat``).
* ``keep`` — train on it with A = 0 (status ``kept_flat``; vanilla GRPO).
* ``drop`` — DAPO dynamic sampling. A step draws ``ceil(oversample · P)`` prompts
  (P = prompts per step); flat groups are dropped; informative groups fill the batch in
  selection order. While fewer than P are informative and refills remain
  (``max_refills`` extra rounds per step), another ``ceil(oversample · deficit)`` prompts
  are sampled. Informative groups beyond P are discarded (status ``discarded``; they
  count as wasted over-samples). If the pool runs dry — refills exhausted or the prompt
  source empty — with fewer than P informative groups, ``fallback`` decides:

  - ``keep``: fill the missing slots with flat groups (in selection order) at A = 0;
  - ``rl_zvp``: fill them with flat groups reshaped by RL-ZVP (sign 0 → A = 0);
  - ``shrink``: train on the smaller batch (the default; ``None`` in the spec means it);
  - ``error``: raise :class:`PoolExhausted`.

With ``rl_zvp`` / ``keep`` nothing is over-sampled: ``oversample`` and ``max_refills``
only apply to ``drop`` (they are reported, not used, otherwise). The RL-ZVP sign comes
from the verifier scores when the group has them (pairwise judge rewards of an all-tie
group are all 0 whether all answers are right or wrong), else from the raw rewards and
the reward range.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from runtime.filters.base import Group, Stage

__all__ = ["FlatGroups", "PoolExhausted"]

Action = Literal["rl_zvp", "drop", "keep"]
Fallback = Literal["keep", "rl_zvp", "shrink", "error"]


class PoolExhausted(RuntimeError):
    """``fallback: error``: the prompt pool could not fill the batch with informative groups."""


class FlatGroups(Stage):
    """Reshape (RL-ZVP), drop-and-refill, or keep groups that are still flat."""

    type = "flat_groups"

    def __init__(
        self,
        action: Action = "rl_zvp",
        oversample: float = 1.0,
        max_refills: int = 0,
        fallback: Fallback | None = "shrink",
    ) -> None:
        super().__init__()
        fallback = "shrink" if fallback is None else fallback
        if action not in ("rl_zvp", "drop", "keep"):
            raise ValueError(f"flat_groups.action must be rl_zvp, drop or keep, got {action!r}")
        if fallback not in ("keep", "rl_zvp", "shrink", "error"):
            raise ValueError(f"flat_groups.fallback: unknown {fallback!r}")
        if oversample < 1 or max_refills < 0:
            raise ValueError("oversample must be ≥ 1 and max_refills ≥ 0")
        self.action = action
        self.oversample = float(oversample)
        self.max_refills = int(max_refills)
        self.fallback = fallback

    def params(self) -> dict[str, Any]:
        return {"action": self.action, "oversample": self.oversample,
                "max_refills": self.max_refills, "fallback": self.fallback}

    # ---- select phase (called by the pipeline)
    def draw_size(self, prompts_per_step: int) -> int:
        if self.action != "drop":
            return prompts_per_step
        return math.ceil(self.oversample * prompts_per_step - 1e-9)

    def refill_size(self, deficit: int, refills_done: int) -> int:
        if self.action != "drop" or refills_done >= self.max_refills or deficit <= 0:
            return 0
        return math.ceil(self.oversample * deficit - 1e-9)

    # ---- after reward
    def process(self, groups: list[Group], step: int) -> None:
        for g in groups:
            if not g.flat:
                g.status = "used"
                continue
            g.zvp_sign = self.ctx.zvp_sign(g)
            self.stats["flat_groups"] += 1
            if self.action == "rl_zvp":
                g.status = "reshaped" if g.zvp_sign else "kept_flat"
            elif self.action == "keep":
                g.status = "kept_flat"
            else:
                g.status = "dropped"

    def assemble(self, groups: list[Group], prompts_per_step: int) -> None:
        """Final statuses of one step's groups (``drop``: fill, discard, fall back)."""
        if self.action != "drop":
            for g in groups:
                self.stats[g.status] += 1
            return
        informative = [g for g in groups if not g.flat]
        for g in informative[prompts_per_step:]:
            g.status = "discarded"
        deficit = prompts_per_step - len(informative)
        if deficit > 0:
            self.stats["pool_dry_steps"] += 1
            self.stats["missing_groups"] += deficit
            if self.fallback == "error":
                raise PoolExhausted(
                    f"only {len(informative)} of {prompts_per_step} groups are informative "
                    f"after {self.max_refills} refill(s)")
            if self.fallback in ("keep", "rl_zvp"):
                for g in [g for g in groups if g.flat][:deficit]:
                    reshape = self.fallback == "rl_zvp" and g.zvp_sign != 0
                    g.status = "reshaped" if reshape else "kept_flat"
                    self.stats["fallback_filled"] += 1
        for g in groups:
            self.stats[g.status] += 1
            if g.status in ("dropped", "discarded"):
                self.stats[g.status + "_rollouts"] += g.n

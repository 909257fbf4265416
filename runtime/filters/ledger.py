r"""Rollout ledger of the ZVE pipeline and the rollout-efficiency figure (DESIGN.md §4).

Rollout counts (policy rollouts generated during RL; every generated group ends in
exactly one status, see ``runtime.filters.base.Status``)::

    generated     all policy rollouts sampled (grown groups, over-samples, refills included)
    used          rollouts of informative (non-flat) groups trained on
    reshaped      rollouts of flat groups trained on with RL-ZVP token advantages
    kept_flat     rollouts of flat groups trained on with A = 0
    dropped       rollouts generated but not trained on: flat groups dropped *and*
                  informative over-samples discarded
    discarded     the over-sample part of ``dropped`` (informative groups not needed)
    zero_variance rollouts of groups flat after reward (and shaping), whatever their fate
    grown         rollouts beyond the base group size n (adaptive group size)
    wasted        = kept_flat + dropped: rollouts that contributed no gradient

``reshaped`` is a class of its own: neither ``used`` (its group had no reward variance)
nor ``wasted`` (RL-ZVP gives its tokens non-zero advantages). The RL metrics line reports
it per step (``rollouts_reshaped``) next to ``reshaped_advantage_share``, the share of the
step's Σ|advantage| those tokens carry (``runtime.advantages.advantage_mass_share``), and
``reshaped_grad_norm_share``, ‖g_R‖ / ‖g‖: the norm of their part of the update's gradient
over the whole gradient's (``runtime.trainer``; the embedded trainer measures it).

    screening          weighted cost of the offline screen, in policy rollouts:
                       samples · proxy_cost_ratio / reuse_epochs
    screening_samples  proxy samples drawn (unweighted)

Each rollout count has a ``groups_*`` twin counting groups. Invariants (``check()``),
for rollouts and for groups alike::

    generated     == used + reshaped + kept_flat + dropped
    0 ≤ discarded ≤ dropped
    zero_variance == reshaped + kept_flat + (dropped − discarded)
    generated − zero_variance == used + discarded          (informative groups)
    generated     == group_size · groups_generated + grown  (rollouts only; groups
                                                            never shrink below n)

``rollouts_per_informative_group`` divides every rollout the run paid for by n per
informative group trained on::

    (generated + screening) / (group_size · groups_used)

The ideal is 1.0× (every rollout in an informative group, no screening); vanilla GRPO
(flat groups kept with A = 0) gives n/(1 − z)/n = 1/(1 − z) with z the zero-variance
rate; DAPO dynamic sampling spends the same on rollouts, plus discarded over-samples.
``count_reshaped=True`` also counts RL-ZVP groups as informative (they carry gradient,
but DESIGN.md's figure is about groups with reward variance).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["Ledger", "rollouts_per_informative_group"]

_ROLLOUTS = ("generated", "used", "reshaped", "kept_flat", "dropped", "discarded",
             "zero_variance")


@dataclass
class Ledger:
    """Rollout and group counts (see module doc). ``+`` adds two ledgers."""

    group_size: int = 1
    steps: int = 0
    generated: int = 0
    used: int = 0
    reshaped: int = 0
    kept_flat: int = 0
    dropped: int = 0
    discarded: int = 0
    zero_variance: int = 0
    grown: int = 0
    groups_generated: int = 0
    groups_used: int = 0
    groups_reshaped: int = 0
    groups_kept_flat: int = 0
    groups_dropped: int = 0
    groups_discarded: int = 0
    groups_zero_variance: int = 0
    screening: float = 0.0
    screening_samples: int = 0
    prompts_screened: int = 0
    prompts_screened_out: int = 0
    prompts_skipped: int = 0
    refills: int = 0

    @property
    def wasted(self) -> int:
        """Rollouts that contributed no gradient: kept_flat + dropped (discards included)."""
        return self.kept_flat + self.dropped

    @property
    def zero_variance_rate(self) -> float:
        """Share of generated groups that were flat."""
        return self.groups_zero_variance / self.groups_generated if self.groups_generated else 0.0

    def count(self, status: str, n: int, flat: bool, grown: int = 0) -> None:
        """Book one group of ``n`` rollouts that ended in ``status``."""
        self.generated += n
        self.groups_generated += 1
        self.grown += grown
        if status == "discarded":
            self.dropped += n
            self.groups_dropped += 1
        setattr(self, status, getattr(self, status) + n)
        key = "groups_" + status
        setattr(self, key, getattr(self, key) + 1)
        if flat:
            self.zero_variance += n
            self.groups_zero_variance += 1

    def __add__(self, other: Ledger) -> Ledger:
        if self.group_size != other.group_size:
            raise ValueError("ledgers of different group sizes")
        out = Ledger(group_size=self.group_size)
        for f in fields(self):
            if f.name != "group_size":
                setattr(out, f.name, getattr(self, f.name) + getattr(other, f.name))
        return out

    def violations(self) -> list[str]:
        """The invariants of the module doc that do not hold (empty when consistent)."""
        bad = []
        for prefix in ("", "groups_"):
            g = {k: getattr(self, prefix + k) for k in _ROLLOUTS}
            if g["generated"] != g["used"] + g["reshaped"] + g["kept_flat"] + g["dropped"]:
                bad.append(f"{prefix}generated != used + reshaped + kept_flat + dropped")
            if not 0 <= g["discarded"] <= g["dropped"]:
                bad.append(f"{prefix}discarded not in [0, dropped]")
            if g["zero_variance"] != g["reshaped"] + g["kept_flat"] + g["dropped"] - g["discarded"]:
                bad.append(f"{prefix}zero_variance != reshaped + kept_flat + dropped − discarded")
            if g["generated"] - g["zero_variance"] != g["used"] + g["discarded"]:
                bad.append(f"{prefix}informative != used + discarded")
        if self.generated != self.group_size * self.groups_generated + self.grown:
            bad.append("generated != group_size · groups_generated + grown")
        return bad

    def check(self) -> None:
        """Raise ``AssertionError`` listing every violated invariant."""
        bad = self.violations()
        if bad:
            raise AssertionError("ledger invariants violated: " + "; ".join(bad))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["wasted"] = self.wasted
        d["zero_variance_rate"] = self.zero_variance_rate
        d["rollouts_per_informative_group"] = rollouts_per_informative_group(self)
        return d


def rollouts_per_informative_group(ledger: Ledger, *, count_reshaped: bool = False) -> float:
    """``(generated + screening) / (n · informative groups)``; 1.0 is ideal (module doc)."""
    groups = ledger.groups_used + (ledger.groups_reshaped if count_reshaped else 0)
    if groups == 0:
        return math.inf
    return (ledger.generated + ledger.screening) / (ledger.group_size * groups)

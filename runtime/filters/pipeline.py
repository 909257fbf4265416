r"""The multi-stage zero-variance elimination pipeline (DESIGN.md §4).

Built from the spec's ``filters`` list (``build_pipeline``); the stages act in the order
listed. Three phases:

1. **screen** (before RL, optional): the ``offline_pass_rate`` stage screens the prompt
   pool with a proxy model; ``load_screen`` books its cost in the ledger and hands the
   pass rates to ``adaptive_group_size``. A separate screening job writes the artifact
   (``ScreenResult.write_jsonl``), the RL job reads it and calls ``load_screen``.
2. **select** (each step, each sampling round): prompts to retry first (``inject``, the
   history stage's cooled-down prompts), then prompts drawn from the source; a prompt
   is taken when every stage admits it (history skips cooling prompts; a prompt is
   taken at most once per step). ``k`` = prompts per step, or
   ``ceil(oversample · P)`` under ``flat_groups: drop``. Then each stage's ``plan``
   (adaptive group size) sets the group sizes.
3. **process** (after reward): each stage's ``process`` in list order — reward shaping
   changes rewards, flat_groups marks flat groups, history records visits, adaptive
   group size updates its pass-rate estimates. The order matters: e.g. history listed
   before reward_shaping records all-correct groups as flat (and skips their prompts),
   listed after it does not. **assemble** fixes each group's final status and books the
   step in the ledger.

``step(step, source, generate, prompts_per_step)`` runs select → generate → process,
with DAPO refill rounds under ``drop``, then assemble, and returns a :class:`Batch`.
Without a ``flat_groups`` stage flat groups are kept with A = 0 (vanilla GRPO).

Stage order rules (the spec's): each type at most once; ``offline_pass_rate`` first;
``reward_shaping`` before ``flat_groups``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from runtime.filters.adaptive_group_size import AdaptiveGroupSize
from runtime.filters.base import IN_BATCH, Context, Group, PromptId, Request, Stage
from runtime.filters.flat_groups import FlatGroups
from runtime.filters.history import History
from runtime.filters.ledger import Ledger
from runtime.filters.offline_pass_rate import OfflinePassRate, SampleFn, ScreenResult
from runtime.filters.reward_shaping import RewardShaping

__all__ = [
    "STAGES",
    "Batch",
    "Generate",
    "Pipeline",
    "PromptSource",
    "PromptStream",
    "build_pipeline",
]

STAGES: dict[str, type[Stage]] = {
    cls.type: cls
    for cls in (OfflinePassRate, AdaptiveGroupSize, RewardShaping, FlatGroups, History)
}

Generate = Callable[[list[Request]], list[Group]]


class PromptSource(Protocol):
    """Where prompts come from: ``take(k)`` returns up to k ids (fewer when exhausted)."""

    def take(self, k: int) -> list[PromptId]: ...

    def __len__(self) -> int: ...


class PromptStream:
    """Prompt ids in a fresh seeded shuffle every epoch; endless unless ``epochs`` is set."""

    def __init__(self, prompt_ids: Sequence[PromptId], *, seed: int = 0,
                 epochs: int | None = None, shuffle: bool = True) -> None:
        self.ids = list(prompt_ids)
        self.epochs = epochs
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self._order: list[PromptId] = []
        self._pos = 0
        self.delivered = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def exhausted(self) -> bool:
        if not self.ids:
            return True
        return self.epochs is not None and self.epoch >= self.epochs and self._pos >= len(self._order)

    def _next_epoch(self) -> bool:
        if not self.ids or (self.epochs is not None and self.epoch >= self.epochs):
            return False
        if self.shuffle:
            self._order = [self.ids[i] for i in self.rng.permutation(len(self.ids)).tolist()]
        else:
            self._order = list(self.ids)
        self._pos = 0
        self.epoch += 1
        return True

    def take(self, k: int) -> list[PromptId]:
        out: list[PromptId] = []
        while len(out) < k:
            if self._pos >= len(self._order) and not self._next_epoch():
                break
            chunk = self._order[self._pos : self._pos + k - len(out)]
            self._pos += len(chunk)
            out += chunk
        self.delivered += len(out)
        return out


@dataclass
class Batch:
    """One step's result: the groups to train on and those generated but not used."""

    step: int
    groups: list[Group]  # status used / reshaped / kept_flat, in selection order
    removed: list[Group]  # status dropped / discarded
    ledger: Ledger  # this step only
    target: int  # prompts per step asked for
    stage_reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def short(self) -> int:
        """Missing groups when the batch shrank (0 when full)."""
        return max(0, self.target - len(self.groups))

    def padded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``rewards [P, G_max]``, ``valid [P, G_max]`` and ``flat_sign [P]`` for
        ``runtime.advantages.rl_zvp_token_advantages(…, valid=…, flat_sign=…)``:
        flat_sign is the RL-ZVP sign of reshaped groups and 0 for every other group."""
        P = len(self.groups)
        G = max((g.n for g in self.groups), default=0)
        rewards = np.zeros((P, G))
        valid = np.zeros((P, G), dtype=bool)
        sign = np.zeros(P, dtype=np.int64)
        for i, g in enumerate(self.groups):
            rewards[i, : g.n] = g.rewards
            valid[i, : g.n] = True
            sign[i] = g.zvp_sign if g.status == "reshaped" else 0
        return rewards, valid, sign


def _check_order(stages: Sequence[Stage]) -> None:
    # The order rules themselves (screen first, shaping before flat_groups, no repeats) are the
    # spec's (`spec.models.Spec._stage_order`), checked before anything is submitted.
    for stage in stages:
        if stage.type not in STAGES:
            raise ValueError(f"unknown filter stage {stage.type!r}; known: {sorted(STAGES)}")


class Pipeline:
    """Multi-stage zero-variance elimination (module doc)."""

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        group_size: int,
        max_tokens: int | None = None,
        seed: int = 0,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if group_size < 1:
            raise ValueError("group_size must be ≥ 1")
        if not reward_range[1] > reward_range[0]:
            raise ValueError("reward_range must be (min, max) with max > min")
        _check_order(stages)
        self.stages = list(stages)
        self.ctx = Context(group_size=int(group_size), max_tokens=max_tokens,
                           reward_min=float(reward_range[0]), reward_max=float(reward_range[1]),
                           seed=seed)
        for s in self.stages:
            s.bind(self.ctx)
        self.seed = seed
        self.ledger = Ledger(group_size=int(group_size))
        self._taken: tuple[int, set[Hashable]] = (-1, set())
        self._skipped = 0  # prompts refused by select since the last assemble

    def stage(self, kind: str) -> Stage | None:
        """The stage of that type, if listed."""
        return next((s for s in self.stages if s.type == kind), None)

    @property
    def flat_stage(self) -> FlatGroups | None:
        s = self.stage("flat_groups")
        return s if isinstance(s, FlatGroups) else None

    def stream(self, prompt_ids: Sequence[PromptId], epochs: int | None = None) -> PromptStream:
        """A :class:`PromptStream` seeded with the pipeline's seed."""
        return PromptStream(prompt_ids, seed=self.seed, epochs=epochs)

    # ------------------------------------------------------------------ screen
    def screen(self, prompts: Sequence[PromptId], sample_fn: SampleFn) -> ScreenResult:
        """Run the offline stage (if listed) and load its result; all prompts survive
        (at no cost) when there is none."""
        off = self.stage("offline_pass_rate")
        if not isinstance(off, OfflinePassRate):
            ids = list(prompts)
            return ScreenResult(ids, np.full(len(ids), np.nan), np.ones(len(ids), dtype=bool), 0)
        result = off.run(prompts, sample_fn)
        self.load_screen(result)
        return result

    def load_screen(self, result: ScreenResult) -> list[PromptId]:
        """Book a screen's cost in the ledger, seed the pass-rate estimates; the survivors."""
        self.ledger.screening += result.cost
        self.ledger.screening_samples += result.samples
        self.ledger.prompts_screened += len(result.prompt_ids)
        self.ledger.prompts_screened_out += int((~result.kept).sum())
        ad = self.stage("adaptive_group_size")
        if isinstance(ad, AdaptiveGroupSize):
            ad.load(result)
        return result.survivors

    # ------------------------------------------------------------------ select
    def select(self, source: PromptSource, step: int, k: int) -> list[Request]:
        """Up to ``k`` requests for this step (module doc, phase 2)."""
        if self._taken[0] != step:
            self._taken = (step, set())
        taken = self._taken[1]
        chosen: list[PromptId] = []
        skipped = 0

        def offer(pid: PromptId) -> None:
            nonlocal skipped
            if pid in taken:
                return
            if all(s.admit(pid, step) for s in self.stages):
                taken.add(pid)
                chosen.append(pid)
            else:
                skipped += 1

        for s in self.stages:
            for pid in s.inject(step, k - len(chosen)):
                offer(pid)
        drawn, limit = 0, max(len(source), 1)
        while len(chosen) < k and drawn < limit:
            got = source.take(min(k - len(chosen), limit - drawn))
            if not got:
                break
            drawn += len(got)
            for pid in got:
                offer(pid)
        self._skipped += skipped
        requests = [Request(pid, self.ctx.group_size) for pid in chosen]
        for s in self.stages:
            requests = s.plan(requests, step)
        return requests

    # ------------------------------------------------------------------ process
    def process(self, groups: list[Group], step: int, round: int = 0) -> list[Group]:
        """Run every stage's ``process`` in list order on freshly rewarded groups."""
        for g in groups:
            g.step, g.round = step, round
            g.zvp_sign = 0
        for s in self.stages:
            s.process(groups, step)
        if self.flat_stage is None:  # vanilla: flat groups train with A = 0
            for g in groups:
                g.status = "kept_flat" if g.flat else "used"
        return groups

    def assemble(self, groups: list[Group], step: int, prompts_per_step: int,
                 refills: int = 0) -> Batch:
        """Final statuses, the step's ledger (added to the run's), and the batch."""
        fs = self.flat_stage
        if fs is not None:
            fs.assemble(groups, prompts_per_step)
        led = Ledger(group_size=self.ctx.group_size, steps=1, refills=refills,
                     prompts_skipped=self._skipped)
        self._skipped = 0
        n0 = self.ctx.group_size
        for g in groups:
            led.count(g.status, g.n, g.flat, grown=max(0, g.n - n0))
        self.ledger = self.ledger + led
        batch = [g for g in groups if g.status in IN_BATCH]
        removed = [g for g in groups if g.status not in IN_BATCH]
        return Batch(step, batch, removed, led, prompts_per_step)

    # ------------------------------------------------------------------ one step
    def step(self, step: int, source: PromptSource, generate: Generate,
             prompts_per_step: int) -> Batch:
        """select → generate → process (refill rounds under drop) → assemble."""
        fs = self.flat_stage
        k = fs.draw_size(prompts_per_step) if fs else prompts_per_step
        groups: list[Group] = []
        refills = 0
        while k > 0:
            requests = self.select(source, step, k)
            if not requests:
                break
            got = generate(requests)
            if len(got) != len(requests) or any(
                g.prompt_id != r.prompt_id or g.n != r.n for g, r in zip(got, requests, strict=True)
            ):
                raise ValueError("generate must return one group per request, in order, "
                                 "with the requested number of responses")
            groups += self.process(got, step, round=refills)
            informative = sum(1 for g in groups if not g.flat)
            k = fs.refill_size(prompts_per_step - informative, refills) if fs else 0
            if k:
                refills += 1
        return self.assemble(groups, step, prompts_per_step, refills)

    def report(self) -> dict[str, Any]:
        """The run's ledger and every stage's report."""
        return {"ledger": self.ledger.to_dict(), "stages": [s.report() for s in self.stages]}


def build_pipeline(
    stages: list[dict[str, Any]],
    *,
    group_size: int,
    max_tokens: int | None = None,
    seed: int = 0,
    reward_range: tuple[float, float] = (0.0, 1.0),
) -> Pipeline:
    """A :class:`Pipeline` from the spec's ``filters`` list: ``STAGES[type](**params)``."""
    built: list[Stage] = []
    for i, entry in enumerate(stages):
        params = dict(entry)
        kind = params.pop("type", None)
        if kind not in STAGES:
            raise ValueError(f"filters[{i}]: unknown stage type {kind!r}; known: {sorted(STAGES)}")
        try:
            built.append(STAGES[kind](**params))
        except TypeError as e:
            raise ValueError(f"filters[{i}] ({kind}): {e}") from e
    return Pipeline(built, group_size=group_size, max_tokens=max_tokens, seed=seed,
                    reward_range=reward_range)

"""The `filters` list: the zero-variance elimination (ZVE) stages, a union tagged by `type`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from spec.models.base import Fraction, NonNegInt, PosFloat, PosInt, Section


class OfflinePassRate(Section):
    """Stage 1: before RL a proxy model samples k answers per prompt; extremes are dropped."""

    type: Literal["offline_pass_rate"]
    proxy_model: str = Field(
        "policy", description="'policy' (the initial checkpoint) or the path of a proxy model."
    )
    samples_per_prompt: PosInt = Field(8, description="k: screening samples per prompt.")
    max_pass_rate: Fraction = Field(
        1.0, description="Prompts with pass rate ≥ this are dropped (too easy)."
    )
    min_pass_rate: Fraction | None = Field(
        None, description="Prompts with pass rate ≤ this are dropped (hopeless); none keeps them."
    )
    proxy_cost_ratio: PosFloat = Field(
        1.0, description="Cost of one proxy rollout relative to one policy rollout."
    )
    reuse_epochs: PosInt = Field(1, description="Epochs that reuse this screen (cost amortised).")
    temperature: Annotated[float, Field(ge=0)] = Field(1.0, description="Screening temperature.")
    nodes: PosInt = Field(1, description="Nodes of the screening job.")

    @model_validator(mode="after")
    def _range(self) -> OfflinePassRate:
        if self.min_pass_rate is not None and self.min_pass_rate >= self.max_pass_rate:
            raise ValueError(
                f"min_pass_rate ({self.min_pass_rate}) ≥ max_pass_rate ({self.max_pass_rate}) "
                "would drop every prompt"
            )
        return self


class AdaptiveGroupSize(Section):
    """Stage 2: prompts with estimated pass rate near 0 or 1 get a larger group."""

    type: Literal["adaptive_group_size"]
    extreme_pass_rate: Annotated[float, Field(gt=0, lt=0.5)] = Field(
        0.1, description="Prompts with p ≤ x or p ≥ 1 − x grow."
    )
    target_mixed_probability: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.8, description="Grow n until 1 − pⁿ − (1 − p)ⁿ reaches this."
    )
    max_n: PosInt = Field(64, description="Largest group size.")
    budget: Annotated[float, Field(ge=1)] = Field(
        1.5, description="Rollouts per step capped at budget × prompts_per_step × n."
    )


class LengthPenalty(Section):
    """reward −= coefficient · length / max_tokens."""

    coefficient: Annotated[float, Field(ge=0)] = Field(0.0, description="Penalty weight.")
    max_tokens: PosInt | None = Field(None, description="Normaliser; default rollout.max_tokens.")


class RepetitionPenalty(Section):
    """reward −= coefficient · (fraction of repeated n-grams)."""

    ngram: PosInt = Field(4, description="n-gram size.")
    coefficient: Annotated[float, Field(ge=0)] = Field(0.0, description="Penalty weight.")


class RewardShaping(Section):
    """Stage 3: length and repetition penalties break ties inside all-correct groups."""

    type: Literal["reward_shaping"]
    scope: Literal["all_correct", "all"] = Field(
        "all_correct", description="Shape only all-correct groups, or every group."
    )
    length: LengthPenalty = Field(default_factory=LengthPenalty)
    repetition: RepetitionPenalty = Field(default_factory=RepetitionPenalty)


class FlatGroups(Section):
    """Stage 4: groups still flat after reward: reshape (RL-ZVP), drop and refill, or keep."""

    type: Literal["flat_groups"]
    action: Literal["rl_zvp", "drop", "keep"] = Field(
        "rl_zvp",
        description="rl_zvp: entropy-shaped token advantages; drop: DAPO dynamic sampling; "
        "keep: train with zero advantage.",
    )
    oversample: Annotated[float, Field(ge=1)] = Field(
        1.0, description="drop: sample this × prompts_per_step prompts, refill from the extra."
    )
    max_refills: NonNegInt = Field(0, description="drop: extra sampling rounds per step.")
    fallback: Literal["keep", "rl_zvp", "shrink", "error"] | None = Field(
        None,
        description="drop: what to do when the pool runs dry — keep flat groups, reshape them, "
        "train on a smaller batch, or stop. Required when the worst case cannot fill a batch.",
    )


class History(Section):
    """Stage 5: a prompt flat in its last `window` visits is skipped for `cooldown_steps`."""

    type: Literal["history"]
    window: PosInt = Field(2, description="Consecutive flat visits that trigger a skip.")
    cooldown_steps: PosInt = Field(20, description="RL steps a skipped prompt rests.")


FilterStage = Annotated[
    OfflinePassRate | AdaptiveGroupSize | RewardShaping | FlatGroups | History,
    Field(discriminator="type"),
]

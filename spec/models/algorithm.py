"""The `algorithm` section (policy loss, advantages, KL, mismatch correction) and the
`router_replay` section (replay of MoE routing in the trainer)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from spec.models.base import PosFloat, PosInt, Section


class GRPOParams(Section):
    """GRPO / DAPO token-level clipped objective."""

    clip_low: PosFloat = Field(0.2, description="Lower clip ε_low: ratio ≥ 1 − ε_low.")
    clip_high: PosFloat = Field(0.28, description="Upper clip ε_high (DAPO clip-higher).")


class GSPOParams(Section):
    """GSPO-token: sequence-level ratio, per-token gradient."""

    clip_low: PosFloat = Field(3e-4, description="Lower clip of the sequence ratio.")
    clip_high: PosFloat = Field(4e-4, description="Upper clip of the sequence ratio.")


class ESPOParams(Section):
    """ESPO: entropy-grouped sequence ratios with entropy-scaled clip ε_τ = α·H̄_τ/ln V."""

    alpha: PosFloat = Field(0.02, description="α of the entropy-scaled clip range.")
    high_entropy_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.2, description="ρ: share of each response's tokens in the high-entropy group."
    )


class CISPOParams(Section):
    """CISPO: clipped, stop-gradient IS weight on a REINFORCE term."""

    eps_high: PosFloat = Field(0.28, description="Upper clip of the IS weight: w ≤ 1 + ε_high.")
    eps_low: PosFloat | None = Field(None, description="Lower clip; none means unbounded below.")


class Advantage(Section):
    """Advantage estimator."""

    estimator: Literal["group", "rl_zvp"] = Field(
        "group",
        description="group: (R − mean)/std within a group; rl_zvp: group, plus entropy-shaped "
        "token advantages for zero-variance groups.",
    )
    alpha_zvp: PosFloat = Field(0.1, description="RL-ZVP scale α_zvp.")
    eps: PosFloat = Field(1e-6, description="Added to the group std.")


class KL(Section):
    """KL penalty to the reference policy (0 disables it and the reference forward)."""

    coefficient: Annotated[float, Field(ge=0)] = Field(0.0, description="KL coefficient β.")
    estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator (Schulman).")


class Correction(Section):
    """Train–inference mismatch correction, w_t = π_train_old / μ_rollout."""

    mode: Literal["none", "tis", "mis"] = Field(
        "tis", description="tis: weight by min(w, cap); mis: mask tokens with w outside [low, high]."
    )
    cap: PosFloat = Field(2.0, description="TIS cap C.")
    low: PosFloat = Field(0.5, description="MIS lower bound.")
    high: PosFloat = Field(2.0, description="MIS upper bound.")

    @model_validator(mode="after")
    def _bounds(self) -> Correction:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Algorithm(Section):
    """The policy update: loss and its parameters, advantages, KL, correction."""

    loss: Literal["espo", "gspo", "grpo", "cispo"] = Field("espo", description="Policy loss.")
    espo: ESPOParams = Field(default_factory=ESPOParams)
    gspo: GSPOParams = Field(default_factory=GSPOParams)
    grpo: GRPOParams = Field(default_factory=GRPOParams)
    cispo: CISPOParams = Field(default_factory=CISPOParams)
    advantage: Advantage = Field(default_factory=Advantage)
    kl: KL = Field(default_factory=KL)
    correction: Correction = Field(default_factory=Correction)
    ppo_epochs: PosInt = Field(1, description="Passes over each rollout batch.")


class RouterReplay(Section):
    """Replay of MoE routing: r3 replays the rollout engine's choices, r2 the trainer's own."""

    mode: Literal["off", "r2", "r3"] = Field(
        "off",
        description="off; r2: record in the old-policy forward, replay in updates; "
        "r3: replay the experts vLLM chose at inference.",
    )

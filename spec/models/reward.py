"""The `reward` section: rule-based verifiers and the optional pairwise judge."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from spec.models.base import Fraction, PosFloat, Section


class Verifier(Section):
    """A rule-based verifier; the reward is the weighted mean of verifier scores."""

    type: Literal["arithmetic", "math"] = Field(
        description="arithmetic: the embedded task; math: normalised exact / numeric match."
    )
    weight: PosFloat = Field(1.0, description="Relative weight.")


class Judge(Section):
    """Pairwise ternary judge (better / tie / worse): reward = (wins − losses)/(G − 1)."""

    type: Literal["rule", "http"] = Field(
        description="rule: compare verifier scores; http: an OpenAI-compatible LLM judge."
    )
    url: str | None = Field(
        None,
        description="Chat-completions endpoint of the judge (http). No credential in it "
        "(`https://user:password@...` is refused): the key goes in api_key_env.",
    )
    model: str | None = Field(None, description="Judge model name (http).")
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable that holds the judge's API key; it must "
        "also be listed in cluster.env_passthrough.",
    )
    tie_margin: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Score difference at or below which two responses tie (rule)."
    )
    timeout_s: PosFloat = Field(60.0, description="Per-request timeout (http).")
    max_parse_failure_rate: Fraction = Field(
        0.1,
        description="Largest share of an RL step's judge replies that may be unreadable (not A, "
        "B or TIE; each counts as a tie); above it the run stops (http).",
    )

    secret_hints: ClassVar[dict[str, str]] = {
        "url": "take the credential out of the URL: put the key in an environment variable, "
        "name it in reward.judge.api_key_env and in cluster.env_passthrough; the judge sends "
        "it as 'Authorization: Bearer <key>' and it is never written",
    }

    @model_validator(mode="after")
    def _http(self) -> Judge:
        if self.type == "http" and (not self.url or not self.model):
            raise ValueError("an http judge needs url and model")
        return self


class Reward(Section):
    """How a response is scored. Length/repetition shaping is a ZVE stage (`filters`)."""

    verifiers: list[Verifier] = Field(min_length=1, description="Verifiers, combined by weight.")
    judge: Judge | None = Field(None, description="Tie-aware pairwise judge inside each group.")

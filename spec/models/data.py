"""The `data` section: prompt files, or the embedded arithmetic task's generator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from spec.models.base import PosInt, Section, Seed


class ArithmeticTask(Section):
    """The embedded verifiable task: multi-digit arithmetic generated from a seed."""

    type: Literal["arithmetic"] = "arithmetic"
    seed: Seed = Field(0, description="Generator seed.")
    train_size: PosInt = Field(2000, description="Training prompts.")
    eval_size: PosInt = Field(200, description="Held-out prompts.")
    min_digits: PosInt = Field(1, description="Fewest digits per operand.")
    max_digits: PosInt = Field(3, description="Most digits per operand.")
    operations: list[Literal["+", "-", "*"]] = Field(
        default_factory=lambda: ["+", "-"], description="Operators drawn from."
    )

    @model_validator(mode="after")
    def _digits(self) -> ArithmeticTask:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) > max_digits ({self.max_digits})")
        if not self.operations:
            raise ValueError("operations is empty")
        return self


class Data(Section):
    """Prompts: JSONL files, or a generator job for the embedded task."""

    train: str | None = Field(None, description="Training prompts: a JSONL file.")
    eval: str | None = Field(
        None, description="Held-out prompts: a JSONL file, read by the eval jobs and the in-run "
        "evaluation; needed with data.train when eval.enabled or eval.every_steps is set.")
    generator: ArithmeticTask | None = Field(
        None, description="Generate train/eval splits in a job of the graph instead of reading files."
    )
    prompt_key: str = Field("prompt", description="JSONL field holding the prompt.")
    answer_key: str = Field("answer", description="JSONL field holding the reference answer.")
    max_prompt_tokens: PosInt = Field(1024, description="Longest prompt, in tokens.")
    shuffle_seed: Seed = Field(0, description="Seed of the prompt order (the prompt ledger follows it).")

    @model_validator(mode="after")
    def _source(self) -> Data:
        if self.generator is None and self.train is None:
            raise ValueError("give data.train (a JSONL file) or data.generator")
        if self.generator is not None and (self.train or self.eval):
            raise ValueError("data.generator writes the splits: remove data.train / data.eval")
        return self

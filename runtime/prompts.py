"""Where a job's prompts come from.

A job's ``dataset`` input is either the user's ``data.train`` (one JSONL file) or the
``data`` job's output (a folder with ``train.jsonl`` and ``eval.jsonl``); the user's ``data.eval`` file, when
given, is the ``eval_dataset`` input of the jobs that evaluate. Every job that
reads prompts resolves its splits here, so both forms work everywhere.

``data.max_prompt_tokens`` is enforced here too: every job that reads prompts (sft, screen,
eval, the RL driver) drops the prompts whose tokenized length exceeds it. They are dropped,
not cut: a cut prompt asks another question (verl's ``filter_overlong_prompts`` does the
same). Prompt ids are taken before dropping (the row's ``id``, else its line index), so
the screen and the driver agree on them whatever tokenizer each uses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from runtime.errors import JobError

__all__ = ["drop_overlong", "eval_file", "eval_max_tokens", "split_file", "train_file"]


def split_file(artifact: Path, split: str) -> Path:
    """The JSONL file of ``split`` in a dataset artifact: a file is the split itself, a
    folder holds ``<split>.jsonl``."""
    return artifact / f"{split}.jsonl" if artifact.is_dir() else artifact


class JobInputs(Protocol):
    """What these functions read of a job (``runtime.jobs.common.JobContext`` is one)."""

    job: str
    inputs: Mapping[str, Any]

    def input_path(self, name: str) -> Path: ...


def train_file(ctx: JobInputs) -> Path:
    """The train split of the job's ``dataset`` input."""
    return split_file(ctx.input_path("dataset"), "train")


def eval_file(ctx: JobInputs) -> Path:
    """The eval split: the job's ``eval_dataset`` input (``data.eval``), else ``eval.jsonl``
    of the generated dataset folder."""
    if "eval_dataset" in ctx.inputs:
        return split_file(ctx.input_path("eval_dataset"), "eval")
    dataset = ctx.input_path("dataset")
    if not dataset.is_dir():  # the user's data.train file holds no eval split
        raise JobError(f"job {ctx.job} has no eval split: {dataset} is the train file; "
                       "set data.eval")
    return dataset / "eval.jsonl"


def eval_rows(ctx: JobInputs) -> dict[int, dict[str, Any]]:
    """The eval split's rows (``eval_file``) by position; a JobError when it is empty (the
    eval jobs read it before they load a model, the RL driver once for its evaluations)."""
    from runtime.files import read_jsonl

    rows = dict(enumerate(read_jsonl(eval_file(ctx))))
    if not rows:
        raise JobError(f"the eval split {eval_file(ctx)} is empty")
    return rows


def drop_overlong(rows: Mapping[Any, dict[str, Any]], tokenizer: Any, data: Mapping[str, Any],
                  log: logging.Logger, split: str) -> dict[Any, dict[str, Any]]:
    """``rows`` (prompt id → row) without the prompts longer than ``data.max_prompt_tokens``
    tokens (``tokenizer.encode`` without special tokens, as the engines get them); logs how
    many were dropped. A JobError when none is left."""
    limit = data.get("max_prompt_tokens")
    if not limit:
        return dict(rows)
    key = data.get("prompt_key") or "prompt"
    kept = {pid: row for pid, row in rows.items()
            if len(tokenizer.encode(str(row[key]), add_special_tokens=False)) <= int(limit)}
    dropped = len(rows) - len(kept)
    if rows and not kept:
        raise JobError(f"every prompt of the {split} split is longer than "
                       f"data.max_prompt_tokens = {limit} tokens")
    log.log(logging.WARNING if dropped else logging.INFO,
            "dropped %d of %d %s prompts longer than data.max_prompt_tokens = %d tokens",
            dropped, len(rows), split, int(limit))
    return kept


def eval_max_tokens(spec: dict[str, Any]) -> int:
    """``eval.max_tokens``; unset (None) means ``rollout.max_tokens``, as the model says."""
    return int(spec["eval"]["max_tokens"] or spec["rollout"]["max_tokens"])


def screened_prompts(ctx: Any, pipeline: Any, prompt_ids: list[Any],
                     log: logging.Logger) -> list[Any]:
    """The train split's prompts RL draws from: those the offline screen (input
    ``pass_rates``) kept, loaded into ``pipeline``; all of them without a screen. A screen
    that kept none is an error, never all prompts instead."""
    from runtime.filters.offline_pass_rate import ScreenResult

    if "pass_rates" not in ctx.inputs:
        return prompt_ids
    ref = ctx.input_path("pass_rates", check=False)
    found = sorted(ref.glob("*.jsonl")) if (ref / ".complete").is_file() else []
    if not found:
        log.warning("input pass_rates (%s) is missing or incomplete: RL runs without the "
                    "offline screen", ref)
        return prompt_ids
    result = ScreenResult.read_jsonl(found[0])
    survivors = pipeline.load_screen(result)
    known = set(prompt_ids)
    kept = [p for p in survivors if p in known]
    if not kept:
        raise JobError(f"the screen {found[0]} kept no prompt of the train split "
                       f"({len(survivors)} survivors, none among its {len(known)} prompts): "
                       "nothing to train on; widen the offline_pass_rate stage's "
                       "min_pass_rate / max_pass_rate")
    unscreened = len(known - set(result.prompt_ids))
    if unscreened:
        log.warning("%d prompt(s) of the train split were not screened (the proxy model's "
                    "tokenizer found them too long): RL leaves them out", unscreened)
    log.info("screen %s: %d of %d prompts survive", found[0], len(kept), len(result.prompt_ids))
    return kept

"""Where a job's prompts come from.

A job's ``dataset`` input is either the user's ``data.train`` (one JSONL file) or the
``data`` job's output (a folder with ``train.jsonl`` and ``eval.jsonl``); the user's ``data.eval`` file, when
given, is the ``eval_dataset`` input of the jobs that evaluate. Every job that
reads prompts resolves its splits here, so both forms work everywhere.
"""

from __future__ import annotations

from pathlib import Path

from runtime.jobs.common import JobContext, JobError

__all__ = ["eval_file", "split_file", "train_file"]


def split_file(artifact: Path, split: str) -> Path:
    """The JSONL file of ``split`` in a dataset artifact: a file is the split itself, a
    folder holds ``<split>.jsonl``."""
    return artifact / f"{split}.jsonl" if artifact.is_dir() else artifact


def train_file(ctx: JobContext) -> Path:
    """The train split of the job's ``dataset`` input."""
    return split_file(ctx.input_path("dataset"), "train")


def eval_file(ctx: JobContext) -> Path:
    """The eval split: the job's ``eval_dataset`` input (``data.eval``), else ``eval.jsonl``
    of the generated dataset folder."""
    if "eval_dataset" in ctx.inputs:
        return split_file(ctx.input_path("eval_dataset"), "eval")
    dataset = ctx.input_path("dataset")
    if not dataset.is_dir():  # the user's data.train file holds no eval split
        raise JobError(f"job {ctx.job} has no eval split: {dataset} is the train file; "
                       "set data.eval")
    return dataset / "eval.jsonl"

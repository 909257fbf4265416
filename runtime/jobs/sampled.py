"""What the screen and eval jobs share: the engine, sampling in batches, resuming, and
splitting the prompts over the job's tasks.

* ``open_engine``: the engine of ``rollout.engine`` (module doc of the function).
* ``sample_batches``: ``n`` answers to every prompt, one ``generate`` call at a time of
  ``call_sequences`` sequences (on served engines a full batch of every replica, on the
  embedded engine ``MAX_SEQUENCES_PER_CALL``); on served engines the next call is in flight
  while one is read, so the replicas do not idle on a call's slowest answers.
* ``sample_resumably``: the same for the prompts a ``runtime.progress.Progress`` does not hold
  yet, each batch's per-prompt values saved before the next: a killed, preempted or timed-out
  job, run again, samples only what is left. The values do not depend on the batching
  (sample j of a prompt is seeded ``seed + j`` on both engines).
* ``split_over_nodes``: on the embedded engine Slurm starts one task per node; task r takes
  the prompts r, r + nodes, r + 2·nodes, ... and hands its values to task 0 through
  ``artifacts/.<output>.shards-<SLURM_JOB_ID>/shard-<r>.json`` (with the work's fingerprint);
  task 0 merges them. On vLLM one task spreads the prompts over every replica of every node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.files import COMPLETE_MARKER
from runtime.jobs.common import JobContext, JobError, atomic_write_json
from runtime.progress import Progress

__all__ = [
    "MAX_SEQUENCES_PER_CALL",
    "Sample",
    "call_sequences",
    "fingerprint",
    "forget_progress",
    "open_engine",
    "progress_for",
    "sample_batches",
    "sample_resumably",
    "sample_texts",
    "split_over_nodes",
]

#: At most this many sequences (prompts × samples) per ``generate`` call.
MAX_SEQUENCES_PER_CALL = 4096
_POLL_S = 1.0  # how often task 0 looks for the other tasks' shards


@dataclass(frozen=True)
class Sample:
    """One sampled answer: its text, token count and finish reason."""

    text: str
    tokens: int
    finish_reason: str


def open_engine(ctx: JobContext, model_dir: Path, seed: int, seq_len: int | None = None) -> Any:
    """The engine the spec's ``rollout.engine`` names: ``vllm`` — the replicas the job's
    launch script started (``runtime.rollout.remote``; each runs
    ``ctx.engine_concurrency(seq_len)`` sequences at once, ``seq_len`` the longest the job
    asks for); ``local`` — a ``LocalEngine`` on the spec's device
    (``runtime.devices.job_device``), one torch thread, FP8-rounded weights under
    ``rollout.fp8`` (as the job's vLLM replicas serve with ``--quantization fp8``)."""
    if ctx.spec["rollout"]["engine"] == "vllm":
        from runtime.rollout.remote import RemoteEngine, engine_endpoints

        return ctx.closing(RemoteEngine(
            model_dir, engine_endpoints(), startup_timeout_s=ctx.startup_timeout_s,
            request_timeout_s=ctx.rollout_timeout_s, max_num_seqs=ctx.engine_concurrency(seq_len),
            stall_s=ctx.rollout_timeout_s, on_stall=ctx.engine_stalled))
    import torch

    from runtime.devices import job_device
    from runtime.rollout.engine import LocalEngine

    torch.set_num_threads(1)
    return LocalEngine(model_dir, device=job_device(ctx.spec), seed=seed,
                       fp8=ctx.model_spec.rollout.fp8)


def sample_batches(engine: Any, prompts: Sequence[str], *, n: int, max_tokens: int,
                   temperature: float, seed: int, top_p: float = 1.0, top_k: int = -1,
                   ahead: int = 0, per_call: int | None = None,
                   ) -> Iterator[tuple[int, list[list[Sample]]]]:
    """``n`` answers to every prompt (decoded without special tokens), one ``generate`` call
    of at most ``per_call`` sequences at a time (``call_sequences``): yields (the index of the
    call's first prompt, its answers), in prompt order. ``ahead`` more calls are in flight
    while one is read (served engines: the replicas go on with the next call while the last
    answers of this one finish; the embedded engine takes one call at a time)."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise JobError(f"the checkpoint {engine.model_dir} has no tokenizer")
    ids = [tokenizer.encode(str(p), add_special_tokens=False) for p in prompts]
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    prompts_per_call = max(1, (per_call or call_sequences(engine)) // n)

    def call(start: int) -> list[list[Sample]]:
        results = engine.generate(ids[start:start + prompts_per_call], n=n, max_tokens=max_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=seed, stop_token_ids=eos)
        return [[Sample(engine.decode(s.token_ids), len(s.token_ids), s.finish_reason)
                 for s in res.samples] for res in results]

    starts = list(range(0, len(ids), prompts_per_call))
    if ahead <= 0:
        yield from ((start, call(start)) for start in starts)
        return
    pool = ThreadPoolExecutor(max_workers=ahead + 1)
    try:
        pending = deque((s, pool.submit(call, s)) for s in starts[:ahead + 1])
        queued = iter(starts[ahead + 1:])
        while pending:
            start, future = pending.popleft()
            answers = future.result()
            nxt = next(queued, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(call, nxt)))
            yield start, answers
    finally:  # a failure is reported now, not after the call still in flight
        pool.shutdown(wait=False, cancel_futures=True)


def call_sequences(engine: Any) -> int:
    """Sequences per ``generate`` call: on served engines one full batch of every replica
    (``rollout.max_num_seqs`` each: a kill loses at most that wave), on the embedded engine
    ``MAX_SEQUENCES_PER_CALL``."""
    return int(getattr(engine, "batch_sequences", 0) or MAX_SEQUENCES_PER_CALL)


def sample_texts(engine: Any, prompts: Sequence[str], **sampling: Any) -> list[list[Sample]]:
    """``sample_batches``' answers to every prompt, in prompt order."""
    return [group for _, batch in sample_batches(engine, prompts, **sampling) for group in batch]


def fingerprint(ctx: JobContext, rows: Mapping[str, Mapping[str, Any]], *parts: Any,
                checkpoints: Sequence[Path] = ()) -> str:
    """What a piece of work is: its prompts (each key with its row's prompt and answer, as
    ``data.prompt_key`` / ``answer_key`` name them), ``parts`` (the sampling parameters), the
    engine that samples (``rollout.engine``, ``rollout.fp8``), the reward that scores, and each
    checkpoint's path and completion marker (a checkpoint written again is other work)."""
    data = ctx.spec["data"]
    digest = hashlib.sha256()
    for key, row in rows.items():
        digest.update(json.dumps([key, row.get(data["prompt_key"]), row.get(data["answer_key"])],
                                 default=str).encode() + b"\n")
    marks = []
    for path in checkpoints:
        marker = Path(path) / COMPLETE_MARKER
        marks.append([str(path), marker.read_text(encoding="utf-8") if marker.is_file() else ""])
    rollout = ctx.spec["rollout"]
    blob = json.dumps([ctx.job, digest.hexdigest(), marks, rollout["engine"], rollout["fp8"],
                       ctx.spec["reward"], *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def progress_for(ctx: JobContext, out_name: str, work: str) -> Progress:
    """This task's ``Progress`` of ``work`` (a fingerprint), next to the output ``out_name``
    (one file per task: ``.<output>.progress-<rank>.jsonl``)."""
    final = ctx.output_path(out_name)
    return Progress(final.parent / f".{final.name}.progress-{ctx.rank}.jsonl", work)


def forget_progress(ctx: JobContext, out_name: str) -> None:
    """The output is complete: every task's progress file goes, and the shards of every
    earlier Slurm job (a killed run's, under its own job id)."""
    final = ctx.output_path(out_name)
    for path in final.parent.glob(f".{final.name}.progress-*.jsonl"):
        path.unlink(missing_ok=True)
    for folder in final.parent.glob(f".{final.name}.shards-*"):
        shutil.rmtree(folder, ignore_errors=True)


def sample_resumably(ctx: JobContext, engine: Any, prompts: dict[str, str], progress: Progress,
                     value: Callable[[str, list[Sample]], Any], *, per_call: int | None = None,
                     **sampling: Any) -> dict[str, Any]:
    """``value(key, answers)`` of every prompt of ``prompts`` (key → text), in their order:
    sampled (``sample_batches``) only for the keys ``progress`` does not hold yet, and saved
    there batch by batch."""
    prompts = {str(k): text for k, text in prompts.items()}  # Progress keys are strings
    todo = [k for k in prompts if k not in progress.done]
    if len(todo) < len(prompts):
        ctx.log.info("resuming: %d of %d prompts were done by an earlier run (%s)",
                     len(prompts) - len(todo), len(prompts), progress.path)
    ahead = 1 if ctx.spec["rollout"]["engine"] == "vllm" else 0
    for start, batch in sample_batches(engine, [prompts[k] for k in todo], ahead=ahead,
                                       per_call=per_call, **sampling):
        keys = todo[start:start + len(batch)]
        progress.add({k: value(k, answers) for k, answers in zip(keys, batch, strict=True)})
        ctx.log.info("sampled %d of %d prompts", len(progress.done), len(prompts))
    return {k: progress.done[k] for k in prompts}


def shard_dir(ctx: JobContext, out_name: str) -> Path:
    """Where the tasks of one job leave their shards (one folder per Slurm job)."""
    final = ctx.output_path(out_name)
    return final.parent / f".{final.name}.shards-{os.environ.get('SLURM_JOB_ID') or 'local'}"


def split_over_nodes(ctx: JobContext, keys: Sequence[str], nodes: int, work_id: str,
                     work: Callable[[list[str]], dict[str, Any]],
                     out_name: str) -> dict[str, Any] | None:
    """Every key's value on task 0 (in ``keys`` order), None on the other tasks.

    Task ``ctx.rank`` of ``nodes`` runs ``work(keys[rank::nodes])``; the other tasks hand
    their values over through files in :func:`shard_dir` (a shard of another ``work_id``,
    left by an earlier attempt on other inputs, is not taken)."""
    rank = ctx.rank
    if not 0 <= rank < nodes:
        raise JobError(f"task rank {rank} outside the job's {nodes} node(s)")
    if nodes > 1:
        ctx.log.info("task %d of %d: %d of %d prompts", rank, nodes, len(keys[rank::nodes]),
                     len(keys))
    mine = work(list(keys[rank::nodes]))
    if nodes == 1:
        return mine
    folder = shard_dir(ctx, out_name)
    if rank != 0:
        atomic_write_json(folder / f"shard-{rank}.json",
                          {"fingerprint": work_id, "rank": rank, "values": mine})
        ctx.log.info("task %d of %d: wrote the values of %d prompts for task 0",
                     rank, nodes, len(mine))
        return None
    shards: dict[int, dict[str, Any]] = {0: mine}
    waiting_since = time.monotonic()
    while len(shards) < nodes:
        for r in range(1, nodes):
            path = folder / f"shard-{r}.json"
            if r in shards or not path.is_file():
                continue
            shard = json.loads(path.read_text(encoding="utf-8"))
            if shard.get("fingerprint") == work_id:
                shards[r] = shard["values"]
        if len(shards) < nodes:
            if time.monotonic() - waiting_since > 60:
                ctx.log.info("waiting for the shards of tasks %s",
                             ", ".join(str(r) for r in range(nodes) if r not in shards))
                waiting_since = time.monotonic()
            time.sleep(_POLL_S)
    merged: dict[str, Any] = {}
    for r, values in shards.items():
        if sorted(values) != sorted(keys[r::nodes]):
            raise JobError(f"the shard of task {r} holds {len(values)} prompts, not its "
                           f"{len(keys[r::nodes])}")
        merged.update(values)
    shutil.rmtree(folder, ignore_errors=True)
    return {k: merged[k] for k in keys}

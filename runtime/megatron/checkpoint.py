"""Megatron-LM's checkpoint directory layout, written atomically by several ranks.

A checkpoint root (``--load`` / ``--save``) holds one directory per saved iteration and a
tracker naming the newest, as Megatron-LM writes them::

    <root>/latest_checkpointed_iteration.txt   "4"  (or "release")
    <root>/iter_0000004/                        a dist_checkpointing directory
    <root>/release/                             a converted checkpoint (no iteration)

Inside, the state dict has Megatron-LM's keys: ``model`` (the model's sharded state dict,
reshardable to any TP/EP layout on load), and for training checkpoints ``optimizer``,
``optimizer_steps`` and ``iteration`` (the RL step, as slime counts it).

Every rank writes its shards into the same directory, so the directory is made by rank 0 as a
hidden temporary sibling (``runtime.jobs.common.atomic_dir``), its name broadcast, and only
renamed into place, with its ``.complete`` marker, after every rank has written: a killed job
leaves no half checkpoint under a final name. The tracker is replaced atomically afterwards.

Loading the distributed optimizer's state leaves torch Adam's ``step`` unset:
:func:`set_adam_step` restores it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from runtime.files import atomic_dir, atomic_write_text, is_complete
from runtime.megatron.parallel import file_group

__all__ = ["TRACKER", "any_rank", "broadcast", "iteration_dir", "latest", "load_model", "prune", "save_model",
           "saved_iterations", "set_adam_step", "shared_atomic_dir", "write_tracker"]

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | os.PathLike[str], iteration: int | None) -> Path:
    """``<root>/iter_0000004``, or ``<root>/release`` for ``None``."""
    return Path(root) / ("release" if iteration is None else f"iter_{iteration:07d}")


def latest(root: str | os.PathLike[str]) -> Path:
    """The checkpoint directory the tracker of ``root`` names (``root`` itself when it is a
    checkpoint directory); FileNotFoundError with what was looked for otherwise."""
    root = Path(root)
    if (root / "metadata.json").is_file():
        return root
    tracker = root / TRACKER
    if not tracker.is_file():
        raise FileNotFoundError(f"no Megatron checkpoint at {root} (neither {TRACKER} nor "
                                "a dist_checkpointing metadata.json)")
    text = tracker.read_text(encoding="utf-8").strip()
    path = iteration_dir(root, None if text == "release" else int(text))
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{tracker} names {path.name}, which is not a dist_checkpointing "
                                "directory (no metadata.json)")
    return path


def saved_iterations(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete ``iter_*`` directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(p.name[5:]), p) for p in root.glob("iter_*")
             if p.name[5:].isdigit() and is_complete(p)]
    return sorted(found)


def write_tracker(root: str | os.PathLike[str], iteration: int | None) -> None:
    atomic_write_text(Path(root) / TRACKER, "release" if iteration is None else str(iteration))


def prune(root: str | os.PathLike[str], keep: int) -> None:
    """Remove all but the newest ``keep`` complete iterations."""
    for _, old in saved_iterations(root)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a no-op without a process group). Through
    ``file_group``, as this module's other collectives: the ranks wait here while rank 0
    writes or prunes files."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=file_group())
    return box[0]


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier(group=file_group())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (collective; ``flag`` without a process group)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    flags: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, bool(flag), group=file_group())
    return any(flags)


@contextlib.contextmanager
def shared_atomic_dir(final: str | os.PathLike[str], **marker_info: Any) -> Iterator[Path]:
    """``atomic_dir`` for a directory every rank writes into (collective): rank 0 makes the
    temporary and broadcasts its path; it becomes ``final`` after all ranks are done. The
    ranks agree on failure, of the block and of rank 0's rename: one rank's error fails them
    all (the temporary is removed), and none waits at a barrier for a rank that left. The
    block must not leave a rank inside a collective the others never reach. A stop (a
    ``BaseException`` such as the trainer's SIGTERM) is not agreed on: it goes through."""
    def agreed(failed: Exception | None) -> None:
        if any_rank(failed is not None):
            raise failed or RuntimeError(f"another rank failed while writing {final}")

    written = False
    try:
        with contextlib.ExitStack() as stack:  # rank 0 holds the atomic_dir
            made = stack.enter_context(atomic_dir(final, **marker_info)) if _rank0() else None
            tmp = Path(broadcast(None if made is None else str(made)))
            failed = None
            try:
                yield tmp
            except Exception as exc:  # re-raised once the ranks agree
                failed = exc
            agreed(failed)
            written = True
    except Exception as exc:
        if not written:
            raise  # the block's failure: every rank raises already
        agreed(exc)  # rank 0's marker, fsync or rename failed
    agreed(None)  # the rename is done before anyone reads ``final``


def save_model(model: Any, root: str | os.PathLike[str]) -> Path:
    """A model-only checkpoint at ``<root>/release`` with its tracker (the conversion job's
    output; ``root`` is that job's temporary output folder), of a GPTModel or a list of model
    chunks (keyed by global names either way, as :func:`load_model` reads them). Collective."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, None)
    if _rank0():
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    sharded = ({f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model)}
               if isinstance(model, list) else model.sharded_state_dict())
    dist_checkpointing.save({"model": sharded}, os.fspath(path))
    if _rank0():
        write_tracker(root, None)
    _barrier()
    return path


def load_model(model: Any, root: str | os.PathLike[str]) -> Path:
    """Load the model weights of the checkpoint ``root`` names (any layout, any iteration;
    optimizer state, if any, is not read) into a GPTModel or a list of model chunks (virtual
    pipeline stages; the checkpoint's tensors are keyed by global names either way).
    Collective; returns the directory read."""
    from megatron.core import dist_checkpointing

    path = latest(root)
    if not isinstance(model, list):
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, os.fspath(path))
        with torch.no_grad():
            model.load_state_dict(state["model"])
        return path
    sharded = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model)}
    state = dist_checkpointing.load({"model": sharded}, os.fspath(path))
    with torch.no_grad():
        for i, chunk in enumerate(model):
            chunk.load_state_dict(state["model"][f"chunk{i}"])
    return path


def set_adam_step(optimizer: Any, step: int) -> None:
    """After a distributed checkpoint's load (``MegatronTrainer.load_checkpoint``): set torch
    Adam's per-parameter ``step`` (its bias correction), creating zero moments
    where the state is still empty. Without Apex or TransformerEngine the distributed
    optimizer's state dict reads ``step`` from that state, which torch only creates at the
    first step, and the dp-reshardable loader restores the moments but not ``step``; every
    parameter takes every optimizer step, so ``step`` is the optimizer-step count.
    TransformerEngine's and Apex's FusedAdam (megatron-core's Adam where they import) keep the
    step in their param groups, which the checkpoint restores, and TE's refuses a per-parameter
    ``step`` (its ``state_dict`` raises KeyError): they are left as they are."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                state["step"] = torch.tensor(float(step))
                state.setdefault("exp_avg", torch.zeros_like(p.data))
                state.setdefault("exp_avg_sq", torch.zeros_like(p.data))

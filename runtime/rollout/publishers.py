"""The RL trainer's side of ``weight_sync: ipc`` and ``nccl``: what holds each version it
writes for the engines, besides the version's folder (``trainer_publisher``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runtime.rollout.weight_transfer import IPCWeightTransfer, NamedTensors

__all__ = ["IPCPublisher", "trainer_publisher"]


class IPCPublisher:
    """The trainer's side of ``weight_sync: ipc``: shares each version it writes (segment
    ``segment_path(owner, version)``), holds what must stay alive while an engine may load
    it, unlinks the versions no engine can be asked to load, all at ``close``. Created, it
    removes what a killed predecessor (same ``owner``) left, and checks that ``versions``
    copies of the checkpoint folder ``like``'s tensors fit in the node's shared memory."""

    def __init__(self, owner: str, like: str | os.PathLike[str] | None = None,
                 versions: int = 1) -> None:
        from runtime.rollout.shared_weights import check_room, remove_segments

        self.owner, self.kept = owner, {}
        remove_segments(owner)
        if like is not None:
            check_room(versions * sum(f.stat().st_size for f in Path(like).glob("*.safetensors")))

    def publish(self, version: int, folder: str | os.PathLike[str],
                named_tensors: NamedTensors) -> None:
        from runtime.rollout.shared_weights import segment_path

        self.kept[version] = IPCWeightTransfer.publish(folder, named_tensors,
                                                       segment_path(self.owner, version))

    def prune(self, oldest: int) -> None:
        """Release every version older than ``oldest``."""
        from runtime.rollout.shared_weights import remove_segments

        self.kept = {v: t for v, t in self.kept.items() if v >= oldest}
        remove_segments(self.owner, keep=lambda version: version >= oldest)

    def close(self) -> None:
        from runtime.rollout.shared_weights import remove_segments

        self.kept.clear()
        remove_segments(self.owner)


def trainer_publisher(weight_sync: str, exchange: Path, owner: str, like: Path,
                      max_staleness: int, *, local: bool, live: bool) -> Any:
    """``ipc``: an IPCPublisher (``max_staleness`` + 2 versions of the checkpoint ``like``
    must fit the node's shared memory: a /dev/shm too small fails now, not after a step).
    ``nccl``: a BroadcastSender, gloo bound to loopback on a ``local`` run, copying what it
    holds only if the tensors are ``live`` (updated in place by the next step) and the next
    step may run while they are held (``max_staleness`` > 0: without it the next batch comes
    after the push). ``disk``: None."""
    if weight_sync == "ipc":
        return IPCPublisher(owner, like, max_staleness + 2)
    if weight_sync == "nccl":
        from runtime.rollout.broadcast_transfer import BroadcastSender
        from runtime.rollout.broadcast_weights import gloo_host

        return BroadcastSender(exchange, gloo_host(local), copy=live and max_staleness > 0)
    return None

"""``weight_sync: nccl``'s data plane: one collective broadcast from the trainer (rank 0) to
every engine, in vLLM's NCCL wire format, over a torch.distributed group.

vLLM's NCCL backend (``NCCLWeightTransferEngine``, vLLM 0.33) puts the trainer (rank 0) and
every engine worker (``rank_offset`` + its rank) in one group. An update announces
``names`` / ``dtype_names`` / ``shapes``; the trainer then broadcasts the tensors in that
order, one broadcast each (unpacked), or packed: their bytes concatenated into uint8
buffers, a buffer closed as soon as it holds more than ``packed_buffer_size_bytes``
(:func:`packed_chunks`; both ends compute the same boundaries from the metadata), one
broadcast per buffer.

Here the group is gloo's, the path of ``cluster.devices: cpu`` (the embedded engine and both
trainers). Its rendezvous is a ``FileStore`` in the run directory, which every process of the
RL job shares, and gloo's pair sockets are bound to ``host``: 127.0.0.1 for a local run, so
nothing listens beyond loopback (vLLM's trainer hosts a ``TCPStore``, which listens on every
interface). On GPUs vLLM's own ``NCCLWeightTransfer`` (``runtime.rollout.weight_transfer``)
is the sender; it is not wired yet.
"""

from __future__ import annotations

import datetime
import math
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["gloo_host", "open_group", "packed_chunks", "receive", "send"]


def packed_chunks(nbytes: Sequence[int], buffer_size_bytes: int) -> list[range]:
    """The tensors (indices) of each packed buffer: vLLM's ``pack_tensors`` adds tensors to a
    buffer until it holds more than ``buffer_size_bytes``; the one that crosses closes it."""
    chunks, start, total = [], 0, 0
    for i, n in enumerate(nbytes):
        total += int(n)
        if total > buffer_size_bytes:
            chunks.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(nbytes):
        chunks.append(range(start, len(nbytes)))
    return chunks


def gloo_host(loopback: bool) -> str:
    """The address gloo's sockets bind to: loopback for a local run, the node's name on a
    cluster (the other nodes' processes must reach it)."""
    return "127.0.0.1" if loopback else socket.gethostname()


def open_group(store_path: str | Path, prefix: str, rank: int, world_size: int, host: str,
               timeout_s: float = 600.0) -> Any:
    """Join the gloo group ``prefix`` whose rendezvous is the ``FileStore`` at ``store_path``;
    returns once all ``world_size`` ranks are in (or raises after ``timeout_s``)."""
    import torch.distributed as dist

    store = dist.PrefixStore(prefix, dist.FileStore(str(store_path), -1))
    # The device decides where gloo listens: the public constructor resolves the host name,
    # which may be a cluster interface; the options pin it to `host`.
    options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, int(rank), int(world_size), options)


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def send(group: Any, tensors: Sequence[tuple[str, torch.Tensor]], *, packed: bool,
         buffer_size_bytes: int) -> None:
    """Rank 0: broadcast ``tensors`` in order (the update's names / dtypes / shapes)."""
    import torch

    if not packed:
        for _, t in tensors:
            _broadcast(group, t.detach().contiguous())
        return
    flat = [_as_bytes(t) for _, t in tensors]
    for chunk in packed_chunks([f.numel() for f in flat], buffer_size_bytes):
        _broadcast(group, torch.cat([flat[i] for i in chunk]))


def receive(group: Any, names: Sequence[str], dtype_names: Sequence[str],
            shapes: Sequence[Sequence[int]], *, packed: bool,
            buffer_size_bytes: int) -> dict[str, torch.Tensor]:
    """An engine: receive the broadcast an update announces, as ``{name: tensor}``."""
    import torch

    if not len(names) == len(dtype_names) == len(shapes):
        raise ValueError(f"{len(names)} names, {len(dtype_names)} dtype_names and "
                         f"{len(shapes)} shapes: one each per tensor")
    dtypes = []
    for n in dtype_names:
        dtype = getattr(torch, str(n), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {n!r}")
        dtypes.append(dtype)
    shapes = [[int(d) for d in s] for s in shapes]
    out: dict[str, torch.Tensor] = {}
    if not packed:
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            out[name] = torch.empty(shape, dtype=dtype)
            _broadcast(group, out[name])
        return out
    nbytes = [math.prod(s) * d.itemsize for s, d in zip(shapes, dtypes, strict=True)]
    for chunk in packed_chunks(nbytes, buffer_size_bytes):
        buffer = torch.empty(sum(nbytes[i] for i in chunk), dtype=torch.uint8)
        _broadcast(group, buffer)
        parts = buffer.split([nbytes[i] for i in chunk])
        for i, part in zip(chunk, parts, strict=True):
            # A copy: a slice's offset need not be aligned for the tensor's dtype.
            out[names[i]] = part.clone().view(dtypes[i]).view(shapes[i])
    return out

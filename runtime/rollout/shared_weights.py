"""Tensors shared between the processes of one node: the data plane of ``weight_sync: ipc``.

vLLM's IPC backend (``IPCWeightTransferUpdateInfo``, unpacked) carries one handle dict per
parameter, ``{device key: handle}``; a receiving worker takes the handle of its own device
and maps the sender's memory instead of receiving a copy over a wire:

* CUDA (vLLM's own): the key is the GPU's UUID, the handle the arguments of torch's
  ``rebuild_cuda_tensor`` (``reduce_tensor``); the receiver sets their device index to its
  own (index 6), as vLLM's ``IPCWeightTransferEngine.receive_weights`` does. The sender
  keeps the tensors alive (``share`` returns them) until the receivers have copied them.
* CPU (the embedded engine's): the key is ``cpu@<hostname>``, the handle
  ``(segment, byte offset, byte length)``. The sender writes all tensors of one update back
  to back (64-byte aligned) into one shared-memory segment, a file of the node's
  ``/dev/shm`` named by the caller, and keeps nothing; the receiver maps the file and views
  each tensor in it. The segment lives until it is unlinked (``remove_segments``: the owner
  removes old versions, its own at exit, and a restarted owner the ones a killed one left),
  so a segment never depends on the sender's process still running.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_room", "device_key", "open_shared", "remove_segments", "segment_path", "share"]

ALIGN = 64  # bytes: every tensor starts at a multiple, so any dtype can view it in place


def _shm_dir() -> Path:
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(os.environ.get("TMPDIR", "/tmp"))


def segment_path(owner: str, version: int) -> Path:
    """The shared-memory segment of ``owner``'s (e.g. a run's trainer) weights ``version``."""
    return _shm_dir() / f"rlspec-{owner}-v{int(version)}"


def remove_segments(owner: str, keep: Callable[[int], bool] = lambda version: False) -> None:
    """Unlink ``owner``'s segments whose version ``keep`` rejects (all by default), and those
    a killed writer left half-written (``.tmp``). A receiver that has one mapped keeps its
    pages until it lets go."""
    prefix = f"rlspec-{owner}-v"
    for path in _shm_dir().glob(prefix + "*"):
        version = path.name[len(prefix):].removesuffix(".tmp")
        if version.isdigit() and (path.suffix == ".tmp" or not keep(int(version))):
            path.unlink(missing_ok=True)


def check_room(need: int) -> None:
    """An OSError that says what to do when ``need`` bytes do not fit in the node's shared
    memory (containers often get 64 MB)."""
    import shutil

    where = _shm_dir()
    free = shutil.disk_usage(where).free
    if need > free:
        raise OSError(f"weight_sync ipc: the weights ({need / 2**20:.1f} MiB) do not fit in "
                      f"{where} ({free / 2**20:.1f} MiB free): give the node (or the "
                      "container: --shm-size) more shared memory, or set system.weight_sync: disk")


def device_key(device: torch.device | str) -> str:
    """The key a tensor on ``device`` is shared under: its GPU's UUID, or ``cpu@<host>``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return str(torch.cuda.get_device_properties(index).uuid)
    if device.type == "cpu":
        return f"cpu@{socket.gethostname()}"
    raise ValueError(f"tensors on {device} cannot be shared between processes")


def _write_segment(path: Path, tensors: Sequence[torch.Tensor]) -> list[tuple[str, int, int]]:
    """Write ``tensors`` into the segment ``path`` (atomically, if it fits); their handles."""
    check_room(sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors))
    handles, offset = [], 0
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for t in tensors:
                data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(b"\0" * (-offset % ALIGN))
                offset += -offset % ALIGN
                f.write(memoryview(data))
                handles.append((str(path), offset, int(data.nbytes)))
                offset += int(data.nbytes)
        os.replace(tmp, path)
    except BaseException:  # a full /dev/shm, or SIGTERM mid-write: leave no half segment
        tmp.unlink(missing_ok=True)
        raise
    return handles


def share(named_tensors: Iterable[tuple[str, torch.Tensor]], segment: str | os.PathLike[str]
          ) -> tuple[list[tuple[str, torch.Tensor]], list[dict[str, Any]]]:
    """Put every tensor where other processes of this node can map it: ``(kept, handles)``.

    CPU tensors are written into the segment file ``segment`` (nothing is kept); CUDA
    tensors are snapshotted on their GPU (detached, contiguous: the sender may go on
    updating its own), and those copies are ``kept``: hold them until the receivers are
    done. ``handles[i]`` is ``{device_key: handle}``."""
    from torch.multiprocessing.reductions import reduce_tensor

    named = list(named_tensors)
    devices = {t.device.type for _, t in named}
    if devices - {"cpu", "cuda"} or len(devices) > 1:
        raise ValueError(f"one update shares tensors of one device type, got {sorted(devices)}")
    if devices == {"cpu"}:
        key = device_key("cpu")
        placed = _write_segment(Path(segment), [t for _, t in named])
        return [], [{key: handle} for handle in placed]
    kept = [(n, t.detach().clone(memory_format=torch.contiguous_format)) for n, t in named]
    handles = [{device_key(t.device): reduce_tensor(t)[1]} for _, t in kept]
    torch.cuda.current_stream().synchronize()  # the copies exist before anyone maps them
    return kept, handles


def open_shared(names: Sequence[str], dtype_names: Sequence[str],
                shapes: Sequence[Sequence[int]], handles: Sequence[Mapping[str, Any]],
                device: torch.device | str) -> list[tuple[str, torch.Tensor]]:
    """The tensors behind ``handles`` (one ``{device key: handle}`` per name), mapped on
    ``device``; ``ValueError`` when one has no handle for this device or its handle does not
    fit its declared dtype and shape, ``OSError`` when its segment is gone."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not len(names) == len(dtype_names) == len(shapes) == len(handles):
        raise ValueError(f"{len(names)} names, {len(dtype_names)} dtype_names, "
                         f"{len(shapes)} shapes and {len(handles)} handles: one each per tensor")
    device = torch.device(device)
    key = device_key(device)
    segments: dict[str, torch.Tensor] = {}
    out: list[tuple[str, torch.Tensor]] = []
    for name, dtype_name, shape, handle in zip(names, dtype_names, shapes, handles, strict=True):
        if key not in handle:
            raise ValueError(f"no IPC handle of {name!r} for this engine's device {key} "
                             f"(handles for {sorted(handle)}): weight_sync ipc needs the "
                             "engine on the trainer's node and device")
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{name}: unknown dtype {dtype_name!r}")
        if device.type == "cuda":
            args = list(handle[key])
            args[6] = device.index if device.index is not None else torch.cuda.current_device()
            tensor = rebuild_cuda_tensor(*args)
        else:
            path, offset, nbytes = handle[key]
            numel = 1
            for d in shape:
                numel *= int(d)
            if nbytes != numel * dtype.itemsize or offset % ALIGN:
                raise ValueError(f"{name}: {nbytes} bytes at offset {offset} cannot hold "
                                 f"{dtype_name} {list(shape)}")
            if path not in segments:
                segments[path] = torch.from_file(path, shared=False, size=os.path.getsize(path),
                                                 dtype=torch.uint8)
            tensor = segments[path][offset:offset + nbytes].view(dtype).reshape(list(shape))
        if tensor.dtype != dtype or list(tensor.shape) != list(shape):
            raise ValueError(f"{name}: the shared tensor is {tensor.dtype} {list(tensor.shape)}, "
                             f"the update declares {dtype_name} {list(shape)}")
        out.append((name, tensor))
    return out

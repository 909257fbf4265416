"""How new weights reach the rollout engines: one class per ``system.weight_sync``.

``WEIGHT_TRANSFERS`` maps ``disk`` / ``nccl`` / ``ipc`` to a class whose ``push`` drives a
whole update of every endpoint of a ``RolloutClient`` (pause → load → publish the version →
resume). The HTTP side is the client's: ``RolloutClient.update_weights`` (vLLM's
start → update → finish sequence) with the backend's ``update_info``, or
``RolloutClient.reload_weights`` for vLLM's path reload.

Facts of the pinned vLLM 0.33.0, read from its wheel and recorded by
``tools/vllm_serve_options.py`` under ``weight_transfer`` in
``tests/vllm_flags/vllm_serve_options.json`` (the tests hold the builders below to them):

* ``--weight-transfer-config '{"backend": ...}'``: ``WeightTransferConfig`` has the one
  field ``backend``; without the flag a worker has no transfer engine and
  ``/start_weight_update`` fails. Engines: nccl, ipc, sparse_nccl, sharded_rdt,
  nccl_m2n, modelexpress. None of them reads a checkpoint from disk.
* ``POST /init_weight_transfer_engine {"init_info": {...}}`` → every worker builds the
  engine's init dataclass from the dict (unknown keys are an error). NCCL
  (``NCCLWeightTransferInitInfo``, keyword-only): ``master_address``, ``master_port``,
  ``rank_offset``, ``world_size``, ``nccl_unique_id_b64`` (instead of the address pair),
  ``packed``, ``packed_buffer_size_bytes``, ``packed_num_buffers``. A worker's rank in the
  group is ``rank_offset + dp_index · (TP · PP) + rank``; vLLM's own trainer uses rank 0
  and ``rank_offset`` 1. IPC (``IPCWeightTransferInitInfo``): ``packed``.
* ``POST /update_weights {"update_info": {...}}`` (or a list, one per worker). NCCL
  (``NCCLWeightTransferUpdateInfo``): ``names``, ``dtype_names`` (``getattr(torch, n)``),
  ``shapes``; the request returns once the worker has received the broadcast, so the
  trainer broadcasts while it is in flight. IPC (``IPCWeightTransferUpdateInfo``): the
  same three plus ``ipc_handles`` or, over HTTP, ``ipc_handles_pickled`` (base64 of the
  pickled per-parameter ``{gpu_uuid: reduce_tensor args}`` list, accepted only with
  ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``) and ``tensor_sizes`` (packed only).
* ``GET /get_world_size`` → ``{"world_size": TP · PP · DP}``.
* Path reload: the workers' ``reload_weights(weights_path=...)`` through
  ``POST /collective_rpc`` (string kwargs). All of these are dev-mode routes
  (``VLLM_SERVER_DEV_MODE=1``).
* Trainer-side helpers: ``nccl_common.trainer_init`` (the trainer's ``PyNcclCommunicator``
  over a ``StatelessProcessGroup`` TCPStore at master_address:master_port) and
  ``packed_tensor.packed_nccl_broadcast_producer``. vLLM also ships whole trainer engines
  (``NCCLTrainerWeightTransferEngine``); they drive a single server, while one group over
  several ``vllm serve`` replicas needs a ``rank_offset`` per replica, built here.

vLLM is imported lazily, only by NCCL's ``connect`` / ``push`` (on a GPU): rlspec's
environment does not have it. IPC's data plane is ``runtime.rollout.shared_weights``: CUDA
IPC handles as vLLM's (torch's ``reduce_tensor``), or, on the CPU, segments of the node's
shared memory that the embedded engine maps (the RL trainer's side:
``runtime.rollout.publishers``).
Neither GPU path has run here (no GPU, no CUDA vLLM); their bodies were checked against
vLLM 0.33.0's own classes and encoders. The CPU path runs in the RL job's tests. On the
CPU, ``nccl`` into the embedded engine is a gloo broadcast in vLLM's NCCL wire format
(``runtime.rollout.broadcast_transfer``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from runtime.rollout.client import RolloutClient

__all__ = [
    "IPC_UPDATE_FILE",
    "WEIGHT_TRANSFERS",
    "DiskWeightTransfer",
    "IPCWeightTransfer",
    "NCCLWeightTransfer",
    "WeightTransfer",
    "driver_weight_transfer",
    "from_folder",
    "group_ranks",
    "tensor_metadata",
]

# The update body of a version the trainer shared (weight_sync ipc), in the version's folder.
IPC_UPDATE_FILE = "ipc_update.json"

NamedTensors = Iterable[tuple[str, "torch.Tensor"]]

# vLLM 0.33's packed-broadcast defaults (packed_tensor.DEFAULT_PACKED_*).
PACKED_BUFFER_SIZE_BYTES = 1024 * 1024 * 1024
PACKED_NUM_BUFFERS = 2


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``: the spelling vLLM turns back with ``getattr(torch, n)``."""
    return str(dtype).rsplit(".", 1)[-1]


def tensor_metadata(named_tensors: Sequence[tuple[str, Any]]) -> dict[str, list[Any]]:
    """``names`` / ``dtype_names`` / ``shapes`` of vLLM's NCCL and IPC update infos, in order."""
    names = [str(n) for n, _ in named_tensors]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    return {
        "names": names,
        "dtype_names": [dtype_name(t.dtype) for _, t in named_tensors],
        "shapes": [[int(d) for d in t.shape] for _, t in named_tensors],
    }


def group_ranks(worker_world_sizes: Sequence[int]) -> tuple[int, list[int]]:
    """One broadcast group over the trainer (rank 0) and the workers of every endpoint: its
    world size and each endpoint's ``rank_offset`` (``1 + Σ workers of the endpoints before
    it``; independent ``vllm serve`` replicas all number their workers from 0)."""
    if not worker_world_sizes or any(int(n) < 1 for n in worker_world_sizes):
        raise ValueError(f"every endpoint needs ≥ 1 worker, got {list(worker_world_sizes)}")
    offsets = [1]
    for n in worker_world_sizes:
        offsets.append(offsets[-1] + int(n))
    return offsets.pop(), offsets


class WeightTransfer(ABC):
    """One way of moving a new policy into every endpoint of a ``RolloutClient``."""

    weight_sync: ClassVar[str]

    def connect(self, client: RolloutClient) -> None:  # noqa: B027 - optional: disk has no setup
        """Once, after ``client.wait_ready``: set up the transfer with every endpoint."""

    @abstractmethod
    def push(
        self,
        client: RolloutClient,
        version: str,
        *,
        path: str | None = None,
        named_tensors: NamedTensors | None = None,
        pause_mode: str | None = "wait",
    ) -> None:
        """Load the new weights on every endpoint and publish ``version``.

        ``path``: the checkpoint folder (disk); ``named_tensors``: the full (unsharded)
        tensors in checkpoint naming, on this process's GPU (nccl, ipc)."""

    def close(self) -> None:  # noqa: B027 - optional: only NCCL holds a communicator
        """Release what ``connect`` opened."""


def from_folder(transfer: Any, client: RolloutClient, version: str, path: str, why: str,
                pause_mode: str | None) -> None:
    """A version the faster route of ``transfer`` (ipc, nccl) cannot move: loaded from its
    folder by ``transfer.fallback``, counted as the route ``disk`` and said (``why``)."""
    if transfer.log is not None:
        transfer.log(f"weights v{version} from the folder {path} ({why})")
    transfer.routes["disk"] += 1
    transfer.fallback.push(client, version, path=path, pause_mode=pause_mode)


class DiskWeightTransfer(WeightTransfer):
    """The engines read the checkpoint folder the trainer wrote.

    ``engine="local"``: the embedded server's transfer backend, ``update_info =
    {"path": ...}`` through the start → update → finish sequence. ``engine="vllm"``:
    vLLM's path reload (``RolloutClient.reload_weights``), since no vLLM transfer
    engine reads from disk. ``devices="cpu"``: vLLM's CPU build leaves its reloaded experts
    unpacked (``runtime.rollout.vllm_worker``), so each reload is followed by its
    ``repack_cpu_experts``."""

    weight_sync = "disk"

    def __init__(self, engine: str = "local", devices: str = "gpu") -> None:
        if engine not in ("local", "vllm"):
            raise ValueError(f"engine must be 'local' or 'vllm', got {engine!r}")
        self.engine = engine
        self.after_reload = ("repack_cpu_experts",) if (engine, devices) == ("vllm", "cpu") else ()

    @staticmethod
    def update_info(path: str) -> dict[str, str]:
        return {"path": str(path)}

    def push(
        self,
        client: RolloutClient,
        version: str,
        *,
        path: str | None = None,
        named_tensors: NamedTensors | None = None,
        pause_mode: str | None = "wait",
    ) -> None:
        if path is None:
            raise ValueError("weight_sync disk pushes a checkpoint folder: pass path")
        if self.engine == "local":
            client.update_weights(
                path, version, update_info=self.update_info(path), pause_mode=pause_mode
            )
        else:
            client.reload_weights(path, version, pause_mode=pause_mode, then=self.after_reload)


class NCCLWeightTransfer(WeightTransfer):
    """vLLM's NCCL backend: this process (trainer rank 0) broadcasts to every engine worker.

    One NCCL group spans the trainer (rank 0) and the workers of all endpoints:
    endpoint k's workers start at ``rank_offset = 1 + Σ world_size of endpoints < k``
    (independent ``vllm serve`` replicas all number their workers from 0). The
    trainer hosts the TCPStore rendezvous at ``master_address:master_port``, which the
    engine nodes must reach."""

    weight_sync = "nccl"

    def __init__(
        self,
        master_address: str,
        master_port: int,
        *,
        packed: bool = True,
        packed_buffer_size_bytes: int = PACKED_BUFFER_SIZE_BYTES,
        packed_num_buffers: int = PACKED_NUM_BUFFERS,
    ) -> None:
        self.master_address = str(master_address)
        self.master_port = int(master_port)
        self.packed = bool(packed)
        self.packed_buffer_size_bytes = int(packed_buffer_size_bytes)
        self.packed_num_buffers = int(packed_num_buffers)
        self._group: Any = None  # vLLM's PyNcclCommunicator once connected

    @staticmethod
    def world_size(worker_world_sizes: Sequence[int]) -> int:
        return group_ranks(worker_world_sizes)[0]

    def init_infos(self, worker_world_sizes: Sequence[int]) -> list[dict[str, Any]]:
        """The ``init_info`` of each endpoint (``NCCLWeightTransferInitInfo`` fields)."""
        world, offsets = group_ranks(worker_world_sizes)
        return [{
            "master_address": self.master_address,
            "master_port": self.master_port,
            "rank_offset": offset,
            "world_size": world,
            # Must-agree wire parameters: the workers decode as the trainer encodes.
            "packed": self.packed,
            "packed_buffer_size_bytes": self.packed_buffer_size_bytes,
            "packed_num_buffers": self.packed_num_buffers,
        } for offset in offsets]

    @staticmethod
    def update_info(named_tensors: Sequence[tuple[str, Any]]) -> dict[str, list[Any]]:
        """``NCCLWeightTransferUpdateInfo``: the broadcast's parameters, in broadcast order."""
        return tensor_metadata(named_tensors)

    def connect(self, client: RolloutClient) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        infos = self.init_infos(client.world_sizes())
        rendezvous = {"master_address": self.master_address, "master_port": self.master_port,
                      "world_size": infos[0]["world_size"]}
        # The workers' init requests return only once the trainer has joined too.
        with ThreadPoolExecutor(max_workers=1) as pool:
            workers = pool.submit(client.init_weight_transfer_engine, infos)
            self._group = trainer_init(rendezvous, rank=0)
            workers.result()

    def push(
        self,
        client: RolloutClient,
        version: str,
        *,
        path: str | None = None,
        named_tensors: NamedTensors | None = None,
        pause_mode: str | None = "wait",
    ) -> None:
        if self._group is None:
            raise RuntimeError("call connect(client) before push")
        if named_tensors is None:
            raise ValueError("weight_sync nccl broadcasts tensors: pass named_tensors")
        tensors = list(named_tensors)
        off_gpu = [n for n, t in tensors if not t.is_cuda]
        if off_gpu:
            raise ValueError(f"NCCL broadcasts GPU tensors; on the CPU: {off_gpu[:5]}")
        info = self.update_info(tensors)
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            # /update_weights returns once the workers have received the broadcast below.
            http = pool.submit(client.update_weights, path or "", version,
                               update_info=info, pause_mode=pause_mode)
            with contextlib.suppress(TimeoutError):
                http.result(timeout=0.5)  # a refusal before the workers join surfaces here
            self._broadcast(tensors)
            http.result()
        finally:
            # Not joined: after a failed broadcast the request never returns.
            pool.shutdown(wait=False)

    def _broadcast(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        import torch

        if self.packed:
            from vllm.distributed.weight_transfer.packed_tensor import (
                packed_nccl_broadcast_producer,
            )

            packed_nccl_broadcast_producer(
                iterator=iter(tensors),
                group=self._group,
                src=0,
                post_iter_func=lambda item: item[1],
                buffer_size_bytes=self.packed_buffer_size_bytes,
                num_buffers=self.packed_num_buffers,
            )
        else:
            stream = torch.cuda.current_stream()
            for _, t in tensors:
                # NCCL reads numel elements from data_ptr(): views must be made contiguous.
                self._group.broadcast(t if t.is_contiguous() else t.contiguous(), src=0,
                                      stream=stream)
        torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        if self._group is not None:
            self._group.destroy()
            self._group = None


class IPCWeightTransfer(WeightTransfer):
    """vLLM's IPC backend, unpacked: the engines map the trainer's memory on their node
    (``runtime.rollout.shared_weights``: CUDA IPC on a GPU, shared memory on the CPU).

    Two ways in. ``named_tensors``: this process shares them for the length of the push
    (CPU ones through a segment of its own). ``path``: the trainer shared a version's tensors
    when it wrote the folder (``publish``: the update body in ``IPC_UPDATE_FILE``, the tensors
    in its segment) and the driver sends that body. When the process that shared them is
    gone (a resumed run: the new trainer has not shared the version the engines restart
    from) or never shared them, the folder is loaded through ``fallback`` (disk), and said.
    Handles go pickled over HTTP: the engines need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``
    (the rendered ``rollout.sh`` sets it)."""

    weight_sync = "ipc"

    def __init__(self, fallback: DiskWeightTransfer | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.fallback = fallback
        self.log = log
        self.routes: Counter[str] = Counter()  # pushes by route: "ipc" / "disk"
        self._connected: set[str] = set()  # endpoints whose transfer engine is set up

    @staticmethod
    def init_info() -> dict[str, bool]:
        """``IPCWeightTransferInitInfo``: only the must-agree ``packed`` flag."""
        return {"packed": False}

    @staticmethod
    def update_info(
        named_tensors: Sequence[tuple[str, Any]], handles: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """``IPCWeightTransferUpdateInfo`` for HTTP: metadata + ``ipc_handles_pickled``."""
        if len(handles) != len(named_tensors):
            raise ValueError(f"{len(handles)} IPC handles for {len(named_tensors)} tensors")
        pickled = base64.b64encode(pickle.dumps([dict(h) for h in handles])).decode("ascii")
        return {**tensor_metadata(named_tensors), "ipc_handles_pickled": pickled}

    @classmethod
    def publish(cls, folder: str | os.PathLike[str], named_tensors: NamedTensors,
                segment: str | os.PathLike[str]) -> list[tuple[str, torch.Tensor]]:
        """Trainer side: share ``named_tensors`` (on the CPU: into the file ``segment``), their
        update body into ``folder/IPC_UPDATE_FILE``; returns what to keep alive meanwhile."""
        from runtime.files import atomic_write_json
        from runtime.processes import process_record
        from runtime.rollout.shared_weights import share

        named = list(named_tensors)
        kept, handles = share(named, segment)
        atomic_write_json(Path(folder) / IPC_UPDATE_FILE, {
            **process_record(), "update_info": cls.update_info(named, handles)})
        return kept

    @staticmethod
    def shared_update(folder: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, str]:
        """The update body the trainer left in ``folder``, or None and why it cannot be used
        (no body, or its process, which holds the tensors, is gone)."""
        from runtime.processes import record_alive

        path = Path(folder) / IPC_UPDATE_FILE
        try:
            shared = json.loads(path.read_text())
        except FileNotFoundError:
            return None, f"{path} does not exist"
        why = record_alive(shared, "trainer process that shared it")
        if why:
            return None, why
        return shared["update_info"], ""

    def connect(self, client: RolloutClient) -> None:
        client.init_weight_transfer_engine([self.init_info()] * len(client.endpoints))
        self._connected = set(client.endpoints)

    def push(
        self,
        client: RolloutClient,
        version: str,
        *,
        path: str | None = None,
        named_tensors: NamedTensors | None = None,
        pause_mode: str | None = "wait",
    ) -> None:
        kept: list[tuple[str, torch.Tensor]] = []
        segment = None
        if named_tensors is not None:
            from runtime.rollout.shared_weights import segment_path, share

            named = list(named_tensors)
            segment = segment_path(f"push{os.getpid()}", sum(self.routes.values()))
            kept, handles = share(named, segment)  # alive until the engines have copied them
            info: dict[str, Any] | None = self.update_info(named, handles)
        elif path is not None:
            info, why = self.shared_update(path)
            if info is None:
                if self.fallback is None:
                    raise ValueError(f"weight_sync ipc: no shared weights for {path}: {why}")
                from_folder(self, client, version, path, f"not over IPC: {why}", pause_mode)
                return
        else:
            raise ValueError("weight_sync ipc: pass named_tensors, or the path of a version "
                             "the trainer shared")
        try:
            if set(client.endpoints) != self._connected:
                self.connect(client)
            client.update_weights(path or "", version, update_info=info, pause_mode=pause_mode)
        finally:
            if segment is not None:
                Path(segment).unlink(missing_ok=True)  # the engines hold their copies now
            if kept:
                import torch

                del kept
                torch.cuda.ipc_collect()
        self.routes["ipc"] += 1
        if self.routes["ipc"] == 1 and self.log is not None:
            self.log(f"weights v{version} mapped over IPC ({len(info['names'])} tensors); "
                     "the next versions too, unless said")


WEIGHT_TRANSFERS: dict[str, type[WeightTransfer]] = {
    "disk": DiskWeightTransfer,
    "nccl": NCCLWeightTransfer,
    "ipc": IPCWeightTransfer,
}


def driver_weight_transfer(
    spec: Mapping[str, Any], log: Callable[[str], None] | None = None,
    exchange: str | os.PathLike[str] | None = None,
) -> tuple[WeightTransfer, str | None]:
    """What the RL driver pushes after each step, and a note when it is not ``weight_sync``.

    The driver holds no tensors, only the folder the trainer writes each step. ``disk``:
    the engines load that folder. ``ipc``: the trainer also shared the version's tensors
    (``IPCWeightTransfer.publish``) and the engines map them; a folder nobody shares now
    (a resumed run's first load) is read from disk. ``nccl`` with the embedded engine: the
    trainer broadcasts the version to the engines when the driver asks
    (``runtime.rollout.broadcast_transfer``, through the run's ``exchange`` folder), the
    same fallback to disk. ``nccl`` with vLLM needs the trainer to join vLLM's NCCL group
    (``NCCLWeightTransfer``), which it does not: the note says the folder is used instead."""
    engine, weight_sync = spec["rollout"]["engine"], spec["system"]["weight_sync"]
    if weight_sync not in WEIGHT_TRANSFERS:
        raise ValueError(f"unknown system.weight_sync {weight_sync!r}")
    disk = (DiskWeightTransfer("local") if engine != "vllm"
            else DiskWeightTransfer("vllm", spec["cluster"]["devices"]))
    if weight_sync == "ipc":
        return IPCWeightTransfer(fallback=disk, log=log), None
    if weight_sync == "nccl" and engine != "vllm":
        from runtime.rollout.broadcast_transfer import BroadcastWeightTransfer

        if exchange is None:
            raise ValueError("weight_sync nccl: pass the run's exchange folder")
        # One broadcast per tensor: over gloo, vLLM's packed 1 GiB buffers load 3-4x slower
        # (bench/weight_sync.py, RESULTS §7).
        return BroadcastWeightTransfer(exchange, fallback=disk, log=log, packed=False), None
    note = None
    if weight_sync == "nccl":
        note = ("system.weight_sync nccl: the trainer does not join vLLM's NCCL group yet; "
                "the vLLM engines reload each step's checkpoint folder instead")
    return disk, note

"""Megatron's parallel state: the process groups of a Megatron run, and collectives on them.

:func:`init_parallel` joins the default process group and builds megatron-core's
tensor / pipeline / expert / context-parallel groups (:func:`destroy_parallel` tears them
down); :func:`use_devices` prepares a process for a spec's ``cluster.devices``;
:func:`comm_device` is where collective tensors live (GPU under NCCL, CPU under gloo),
:func:`all_gather` gathers a tensor over a group and :func:`all_max` takes integers' maximum
over all ranks; :func:`file_group` is the group the ranks wait on each other's file work
through. Every other module of ``runtime.megatron`` builds on these; this one imports none of
them (the CPU patches of :mod:`runtime.megatron.cpu` only when asked for).
"""

from __future__ import annotations

import datetime
import os

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor

__all__ = ["all_gather", "all_max", "comm_device", "destroy_parallel", "file_group",
           "init_parallel", "use_devices"]

# Ranks wait on one rank's file work through a gloo group with this timeout: a pipeline
# stage's writer of the HF folder writes the whole stage's weights each step (61 GB per
# writer at 245B), rank 0 prunes checkpoints of TBs, and NCCL's default of 10 minutes would
# abort the ranks waiting meanwhile. Compute collectives keep NCCL's.
FILE_WAIT = datetime.timedelta(hours=2)
_file_group: object | None = None


def init_parallel(rank: int, world_size: int, rendezvous: str | os.PathLike[str], *,
                  tp: int = 1, ep: int = 1, pp: int = 1, etp: int = 1,
                  vpp: int | None = None, cp: int = 1, backend: str = "gloo",
                  seed: int = 1234) -> ProcessGroupCollection:
    """Join the default group, build megatron's tensor/expert-parallel groups and
    :func:`file_group`, seed megatron's named RNG states (``model_parallel_cuda_manual_seed``)
    and return the groups as a ``ProcessGroupCollection``. ``rendezvous`` is an init method
    (``env://`` under torchrun) or a file path (``file://`` rendezvous: nothing listens, as
    tests on this machine need)."""
    global _file_group
    init_method = os.fspath(rendezvous)
    if "://" not in init_method:
        init_method = f"file://{init_method}"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, init_method=init_method,
                                             rank=rank, world_size=world_size)
    _file_group = torch.distributed.new_group(backend="gloo", timeout=FILE_WAIT)
    # etp: expert-tensor parallelism (1: experts whole on their EP rank; Megatron-LM's
    # default when --expert-tensor-parallel-size is unset is ETP = TP, which callers pass)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp,
                                             expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=etp,
                                             context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def use_devices(devices: str) -> tuple[str, torch.dtype | None]:
    """Prepare this process for megatron-core on a spec's ``cluster.devices``; returns the
    process-group backend and the parameter dtype the device forces (None: the spec's).
    ``gpu``: this rank's GPU (``LOCAL_RANK``), NCCL. ``cpu``: the patches of
    :mod:`runtime.megatron.cpu` (tests and CPU smoke runs only; GPU runs never import it),
    gloo, and float32 as the embedded engines use on the CPU."""
    if devices == "cpu":
        from runtime.megatron.cpu import enable_cpu

        enable_cpu()
        return "gloo", torch.float32
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from megatron.core.transformer.moe import moe_utils

    # 0.16.1 binds te_general_gemm only when TransformerEngine imports, but every router reads
    # it: without TE the first router forward is a NameError (measured on an H200).
    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return "nccl", None


def file_group() -> object | None:
    """The group (every rank, gloo, ``FILE_WAIT``) to wait on another rank's file work
    through; None (the default group) outside :func:`init_parallel`."""
    return _file_group


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    global _file_group
    _file_group = None
    RouterReplay.clear_global_router_replay_instances()
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_gather(t: Tensor, size: int, group: object) -> list[Tensor]:
    """Every rank's ``t`` of a group of ``size`` ranks (``[t]`` when alone)."""
    if size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return parts


def comm_device() -> torch.device:
    """Where collective tensors must live: the GPU for NCCL, the CPU for gloo."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_max(values: list[int]) -> list[int]:
    """Element-wise max over all ranks (every rank must call it with as many values)."""
    t = torch.tensor(values, dtype=torch.long, device=comm_device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]

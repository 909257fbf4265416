"""Every CPU-only adaptation megatron-core needs, in one place (test support).

megatron-core 0.16.1 assumes CUDA (+ TransformerEngine). Its pure-PyTorch ("local") modules,
DDP, distributed optimizer, schedules, activation recomputation and distributed checkpoints
do run on CPU once these nine things hold; :func:`enable_cpu` arranges the seven global ones:

1. ``torch.cuda.current_device`` returns ``torch.device("cpu")`` — routers, experts and
   rotary embeddings allocate with ``device=torch.cuda.current_device()``.
2. ``megatron.core.transformer.moe.moe_utils.te_general_gemm = None`` — 0.16.1 only binds that
   name when TransformerEngine imports, yet every router gemm (`router_gating_linear`) reads it
   (``NameError`` without TE).
3. the "CUDA" RNG tracker (``tensor_parallel.random._CUDA_RNG_STATE_TRACKER``, forked by
   ``DotProductAttention`` and the experts even at dropout 0) keeps CPU generator states:
   :class:`CpuRNGStatesTracker`. ``model_parallel_cuda_manual_seed`` then works unchanged.
4. the modules that allocate small bookkeeping tensors with a literal ``device="cuda"`` (the
   schedules' token count, the optimizer's found-inf / scale tensors, the grad-norm
   all-reduce) see a ``torch`` whose factories map ``"cuda"`` to the CPU
   (:data:`_CUDA_LITERAL_MODULES`; every other attribute is the real ``torch``).
5. ``Tensor.type()`` without arguments names CPU tensors as CUDA ones
   (``torch.FloatTensor`` → ``torch.cuda.FloatTensor``): the optimizers accept parameters
   by that name only.
6. ``torch.cuda.synchronize`` is a no-op (the checkpoint writer syncs before copying tensors;
   the CPU has no streams to wait for).
7. activation recomputation (``CheckpointFunction``) saves and restores a "CUDA" generator
   state next to the CPU one and the tracker's: on the CPU there is none to save
   (``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``).
7b. under context parallelism the rotary embeddings take this CP rank's positions with
   ``get_pos_emb_on_this_cp_rank``, which builds its index in pinned memory and copies it to
   the GPU: the rotary modules get :func:`_pos_emb_on_this_cp_rank` (the same selection).
7c. with tied embeddings over pipeline stages the last stage's copy of the embedding is
   moved with ``Tensor.cuda()`` before the all-reduce that fills it from the first stage:
   ``LanguageModule.setup_embeddings_and_output_layer`` runs with ``Tensor.cuda`` as the
   identity (:func:`_setup_embeddings_on_cpu`).

and the caller provides the other two (:mod:`runtime.megatron.parallel` and
:mod:`runtime.megatron.model` do):

8. a gloo process group (``torch.distributed.init_process_group("gloo", init_method=
   "file://…")`` — loopback only, never ``env://``) and ``parallel_state`` groups built on it,
   handed to the model as an explicit ``ProcessGroupCollection``;
9. the allgather token dispatcher (``moe_token_dispatcher_type="allgather"``); alltoall/flex
   need CUDA streams or DeepEP.

Production code on GPUs never imports this module; the engine calls :func:`enable_cpu` only
when a spec says ``cluster.devices: cpu`` (today: the tests). The patches are process-wide
and idempotent; :func:`disable_cpu` undoes them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.tensor_parallel import random as _random

__all__ = ["CpuRNGStatesTracker", "cpu_enabled", "disable_cpu", "enable_cpu"]

_saved: dict[str, Any] = {}

# Modules of megatron-core 0.16.1 with ``device="cuda"`` literals on the training path.
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor")
# Modules that bind ``get_pos_emb_on_this_cp_rank`` (7b of the module doc).
_ROPE_MODULES = (
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
)


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group: Any) -> torch.Tensor:
    """megatron-core's ``get_pos_emb_on_this_cp_rank`` without pinned memory: chunks r and
    2·CP−1−r of ``pos_emb`` along ``seq_dim``."""
    cp, r = cp_group.size(), cp_group.rank()
    idx = torch.tensor([r, 2 * cp - r - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by :data:`_CUDA_LITERAL_MODULES`: factories put "cuda" tensors on
    the CPU; any other attribute is the real module's."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


def _tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``Tensor.type`` that names a CPU tensor as its CUDA type when asked for its name."""
    name = _saved["tensor_type"](self, *args, **kwargs)
    if args or kwargs or self.device.type != "cpu":
        return name
    return name.replace("torch.", "torch.cuda.", 1)


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _no_sync(device: Any = None) -> None:
    return None


def _no_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Activation checkpointing's "CUDA" generator state: there is none on the CPU (the CPU
    generator is saved next to it, and the named states by the tracker)."""
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
    return None


class CpuRNGStatesTracker(_random.CudaRNGStatesTracker):
    """megatron's named-RNG-state tracker over the CPU generator (``torch.get_rng_state``)."""

    def add(self, name: str, seed: int) -> None:
        """Track a new named state seeded with ``seed``; the global CPU state is unchanged."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = _random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the block under state ``name``, then restore the caller's CPU state."""
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def enable_cpu() -> None:
    """Apply the process-wide CPU patches (1–3 of the module doc); idempotent."""
    if _saved:
        return
    from megatron.core.transformer.moe import moe_utils

    _saved["rng_tracker"] = (_random._CUDA_RNG_STATE_TRACKER,
                             _random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    _random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    _random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    _saved["current_device"] = torch.cuda.current_device
    _saved["synchronize"] = torch.cuda.synchronize
    torch.cuda.synchronize = _no_sync  # type: ignore[assignment]
    _saved["te_general_gemm"] = getattr(moe_utils, "te_general_gemm", _MISSING)
    torch.cuda.current_device = _cpu_device  # type: ignore[assignment]
    if not getattr(moe_utils, "HAVE_TE", False):
        moe_utils.te_general_gemm = None

    cpu_torch = _CpuTorch()
    _saved["torch_of"] = {}
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        _saved["torch_of"][name] = module.torch
        module.torch = cpu_torch
    _saved["tensor_type"] = torch.Tensor.type
    torch.Tensor.type = _tensor_type  # type: ignore[method-assign, assignment]
    _saved["cuda_rng_state"] = (_random._get_cuda_rng_state, _random._set_cuda_rng_state)
    _saved["pos_emb"] = {}
    for name in _ROPE_MODULES:
        module = importlib.import_module(name)
        _saved["pos_emb"][name] = module.get_pos_emb_on_this_cp_rank
        module.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    _random._get_cuda_rng_state = _no_cuda_rng_state
    _random._set_cuda_rng_state = _set_no_cuda_rng_state
    _saved["setup_embeddings"] = LanguageModule.setup_embeddings_and_output_layer
    LanguageModule.setup_embeddings_and_output_layer = _setup_embeddings_on_cpu


def _setup_embeddings_on_cpu(self: Any) -> None:
    """megatron-core's set-up of the tied embedding copies (7c), its tensors left on the CPU."""
    real = torch.Tensor.cuda
    torch.Tensor.cuda = lambda t, *args, **kwargs: t  # type: ignore[method-assign, assignment]
    try:
        _saved["setup_embeddings"](self)
    finally:
        torch.Tensor.cuda = real  # type: ignore[method-assign]


def disable_cpu() -> None:
    """Undo :func:`enable_cpu`."""
    if not _saved:
        return
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = _saved.pop("current_device")
    torch.cuda.synchronize = _saved.pop("synchronize")
    for name, real in _saved.pop("torch_of").items():
        importlib.import_module(name).torch = real
    for name, real in _saved.pop("pos_emb").items():
        importlib.import_module(name).get_pos_emb_on_this_cp_rank = real
    torch.Tensor.type = _saved.pop("tensor_type")  # type: ignore[method-assign]
    LanguageModule.setup_embeddings_and_output_layer = _saved.pop("setup_embeddings")
    _random._get_cuda_rng_state, _random._set_cuda_rng_state = _saved.pop("cuda_rng_state")
    _random._CUDA_RNG_STATE_TRACKER, _random._CUDA_RNG_STATE_TRACKER_INITIALIZED = (
        _saved.pop("rng_tracker"))
    gemm = _saved.pop("te_general_gemm")
    if gemm is _MISSING:
        if hasattr(moe_utils, "te_general_gemm"):
            del moe_utils.te_general_gemm
    else:
        moe_utils.te_general_gemm = gemm


def cpu_enabled() -> bool:
    """Whether :func:`enable_cpu` is in effect."""
    return bool(_saved)


class _Missing:
    pass


_MISSING = _Missing()

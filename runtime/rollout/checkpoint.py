"""Reading a checkpoint for the embedded engine's ``load_weights``.

``LocalEngine.load_weights(source, version)`` takes a checkpoint of the same
architecture: a directory of ``*.safetensors`` as ``save_pretrained`` writes them, one
``.safetensors`` file, or the tensors themselves (a name → tensor mapping: those an IPC
update mapped, ``runtime.rollout.shared_weights``); checkpoint or fused parameter names
both work since transformers' own loader maps them. A mapping in the served model's own
names and shapes (the embedded trainer's ``state_dict``) is copied in directly.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from typing import Any

import torch

from runtime.rollout.outputs import EngineError

__all__ = ["read_checkpoint"]


def read_checkpoint(
    model: Any, config: Any, dtype: torch.dtype,
    path: str | os.PathLike[str] | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The state dict stored at ``path`` (or given as a mapping), in ``model``'s parameter
    names and shapes; ``EngineError`` if there is none or it does not fit ``model``."""
    from safetensors.torch import load_file

    if isinstance(path, Mapping):
        live = model.state_dict()
        if set(path) == set(live) and all(path[k].shape == t.shape for k, t in live.items()):
            return dict(path)  # the served model's own names and shapes: nothing to convert
        return _fit(model, config, dtype, dict(path), "the shared weights")
    p = os.fspath(path)
    if os.path.isdir(p):
        files = sorted(glob.glob(os.path.join(p, "*.safetensors")))
    elif os.path.isfile(p) and p.endswith(".safetensors"):
        files = [p]
    else:
        raise EngineError(f"no safetensors checkpoint at {p!r}")
    if not files:
        raise EngineError(f"no *.safetensors files in {p!r}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return _fit(model, config, dtype, state, f"checkpoint {p!r}")


def _fit(model: Any, config: Any, dtype: torch.dtype, state: dict[str, torch.Tensor],
         what: str) -> dict[str, torch.Tensor]:
    # transformers' loader applies the model's checkpoint conversions (e.g. the
    # per-expert → fused expert weights of Qwen3-MoE); we only borrow its result.
    try:
        fresh, info = type(model).from_pretrained(
            None,
            config=config,
            state_dict=state,
            dtype=dtype,
            use_kernels=False,
            output_loading_info=True,
        )
    except (RuntimeError, ValueError, KeyError) as exc:
        raise EngineError(f"cannot load weights from {what}: {exc}") from exc
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise EngineError(
            f"{what} does not fit the served model: {problems or info['error_msgs']}"
        )
    new_state = fresh.state_dict()
    live = model.state_dict()
    if set(new_state) != set(live):
        raise EngineError(f"{what} has different parameters than the served model")
    bad = [k for k in live if live[k].shape != new_state[k].shape]
    if bad:
        raise EngineError(f"{what}: shape mismatch for {bad[:5]}")
    return new_state

"""vLLM ``routed_experts`` codec and id storage.

vLLM returns, per request, base64 of the ``.npy`` bytes of an integer array
[num_tokens − 1, moe_layers, top_k] (``decode_routed_experts`` / ``encode_routed_experts``).
Stored ids are uint8 when the model has E ≤ 256 experts, else int16 (``storage_dtype``), so
routing costs moe_layers · top_k · itemsize bytes per token (``routing_bytes_per_token``).
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch

from runtime.router_replay.selection import RoutingMismatch

__all__ = [
    "compact",
    "decode_routed_experts",
    "encode_routed_experts",
    "routing_bytes_per_token",
    "storage_dtype",
]

# Largest expert count whose ids fit the int16 storage dtype.
_MAX_EXPERTS = int(np.iinfo(np.int16).max) + 1


def storage_dtype(num_experts: int) -> np.dtype:
    """uint8 when num_experts ≤ 256, else int16 (ids up to 32767)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be ≥ 1, got {num_experts}")
    if num_experts <= 256:
        return np.dtype(np.uint8)
    if num_experts <= _MAX_EXPERTS:
        return np.dtype(np.int16)
    raise ValueError(f"{num_experts} experts do not fit the int16 id storage (max {_MAX_EXPERTS})")


def _torch_storage_dtype(num_experts: int) -> torch.dtype:
    return torch.uint8 if storage_dtype(num_experts) == np.uint8 else torch.int16


def routing_bytes_per_token(moe_layers: int, top_k: int, num_experts: int) -> int:
    """Bytes of stored routing per token: moe_layers · top_k · itemsize(storage_dtype)."""
    return int(moe_layers * top_k * storage_dtype(num_experts).itemsize)


def _check_ids_array(arr: np.ndarray, num_experts: int, *, what: str) -> None:
    if not np.issubdtype(arr.dtype, np.integer):
        raise RoutingMismatch(f"{what}: expert ids must be integers, got dtype {arr.dtype}")
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_experts:
        raise RoutingMismatch(
            f"{what}: expert ids must be in [0, {num_experts}), found range [{lo}, {hi}]"
        )


def compact(arr: np.ndarray, num_experts: int) -> np.ndarray:
    """Check the ids lie in [0, num_experts) and cast to ``storage_dtype(num_experts)``."""
    arr = np.asarray(arr)
    _check_ids_array(arr, num_experts, what="compact")
    return arr.astype(storage_dtype(num_experts), copy=False)


def decode_routed_experts(b64: str | bytes) -> np.ndarray:
    """Decode vLLM's ``routed_experts`` (base64 of ``.npy`` bytes) to an integer array
    [num_tokens − 1, moe_layers, top_k] in the dtype the server sent (uint8/uint16/int32)."""
    try:
        raw = base64.b64decode(b64, validate=True)
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (binascii.Error, ValueError, OSError, EOFError) as exc:
        raise RoutingMismatch(f"routed_experts is not base64 of a .npy array: {exc}") from exc
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise RoutingMismatch(
            f"routed_experts must be an integer array [tokens - 1, moe_layers, top_k], got "
            f"shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.size and arr.shape[2] > 1:
        ordered = np.sort(arr, axis=2)
        repeated = (ordered[..., 1:] == ordered[..., :-1]).any(axis=(1, 2))
        if repeated.any():
            # A top-k selection names k distinct experts. vLLM run with compiled graphs returns
            # an all-zero array (its graphs do not record the routing), which would replay
            # expert 0 everywhere without a word.
            raise RoutingMismatch(
                f"routed_experts repeats an expert within one token's top-{arr.shape[2]} at "
                f"{int(repeated.sum())} of {arr.shape[0]} rows (first: row "
                f"{int(repeated.argmax())}): not a routing. An all-zero array comes from vLLM "
                "without --enforce-eager, whose compiled graphs do not record routed experts")
    return arr


def encode_routed_experts(arr: np.ndarray, *, num_experts: int | None = None) -> str:
    """Inverse of ``decode_routed_experts``: base64 of the ``.npy`` bytes of ``arr``.

    The dtype of ``arr`` is kept; with ``num_experts`` the ids are first cast to the
    smallest of uint8 / uint16 / int32 that holds them (what a server would send).
    """
    arr = np.asarray(arr)
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise RoutingMismatch(
            f"routed_experts must be an integer array [tokens - 1, moe_layers, top_k], got "
            f"shape {arr.shape} dtype {arr.dtype}"
        )
    if num_experts is not None:
        _check_ids_array(arr, num_experts, what="encode")
        wire = np.uint8 if num_experts <= 256 else np.uint16 if num_experts <= 65536 else np.int32
        arr = arr.astype(wire, copy=False)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")

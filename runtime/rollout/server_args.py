"""The command line of the embedded rollout server (``python -m runtime.rollout.server``):
vLLM's flag names where vLLM has the flag."""

from __future__ import annotations

import argparse
import json

__all__ = ["parse_args"]


def _weight_transfer_backend(text: str) -> str:
    """``--weight-transfer-config`` is vLLM's JSON ``{"backend": ...}``; disk, ipc, nccl here."""
    try:
        backend = json.loads(text)["backend"]
    except (ValueError, TypeError, KeyError) as exc:
        raise argparse.ArgumentTypeError(f'expected {{"backend": "ipc"}}, got {text!r}') from exc
    if backend not in ("disk", "ipc", "nccl"):
        raise argparse.ArgumentTypeError(f"backend {backend!r}: this server implements ipc "
                                         "and nccl (and disk, always)")
    return str(backend)


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """The server's command line (module doc of ``runtime.rollout.server``)."""
    ap = argparse.ArgumentParser(
        prog="python -m runtime.rollout.server", description=description
    )
    ap.add_argument(
        "--model", required=True, help="checkpoint directory (config.json + safetensors)"
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument(
        "--served-model-name", default=None, help="model id clients send (default: --model)"
    )
    ap.add_argument(
        "--return-routed-experts",
        "--enable-return-routed-experts",
        dest="return_routed_experts",
        action="store_true",
        help="add routed_experts to every choice (vLLM --enable-return-routed-experts)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of unseeded requests' randomness")
    ap.add_argument("--device", default="cpu")
    # One intra-op thread by default: a small policy's ops are too small to split, and
    # OpenMP threads that spin against other processes on shared cores cost ~10× (we
    # measured 21k vs 1-2k tokens/s on 2 busy cores). Scale out with more servers, or
    # raise this for a large model on dedicated cores.
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch default)"
    )
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument(
        "--logprobs-mode", default="raw_logprobs", choices=("raw_logprobs", "processed_logprobs")
    )
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument(
        "--quantization", default=None, choices=("fp8",),
        help="fp8: round the linear and expert weights through float8_e4m3fn at load and every "
        "weight update (vLLM --quantization fp8; runtime.rollout.fp8)",
    )
    ap.add_argument(
        "--weight-transfer-config", type=_weight_transfer_backend, default='{"backend": "disk"}',
        metavar="JSON", help='\'{"backend": "ipc"}\': also take IPC weight updates (vLLM '
        "--weight-transfer-config; runtime.rollout.shared_weights); nccl: join the trainer's "
        "broadcast group and receive them (runtime.rollout.broadcast_weights). Without it, "
        "the disk backend only (update_info {'path': ...})",
    )
    ap.add_argument(
        "--enable-sleep-mode", action="store_true",
        help="allow POST /sleep at level 1 or 2 to release the weights and KV cache (vLLM "
        "--enable-sleep-mode; colocated placement, runtime.rollout.sleeping)",
    )
    ap.add_argument(
        "--allow-non-loopback", action="store_true", help="allow binding a non-loopback address"
    )
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return ap.parse_args(argv)

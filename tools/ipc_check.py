"""The data plane of ``weight_sync: ipc`` across two processes of one node, on its device:
``runtime.rollout.shared_weights.share`` in this process, ``open_shared`` in a child, every
tensor compared bit for bit. On a GPU this is CUDA IPC (vLLM's handles: the GPU's UUID and
``reduce_tensor``), the path colocated engines would map the trainer's weights by; on a CPU,
the shared-memory segment the embedded engine maps. Run by ``tools/gpu_check.sh``; never by CI.

    PYTHONPATH=. python tools/ipc_check.py --device cuda|cpu
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from runtime.rollout.shared_weights import open_shared, remove_segments, segment_path, share
from runtime.rollout.weight_transfer import IPCWeightTransfer


def tensors(device: str) -> list[tuple[str, torch.Tensor]]:
    """A model's kinds of weights: bf16 and fp32 matrices, a strided view, 0-dim, empty."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(1024, 4096, generator=g)
    named = [("embed", big.to(torch.bfloat16)), ("norm", torch.randn(4096, generator=g)),
             ("view", big[:, ::2]), ("scalar", torch.tensor(3.5)),
             ("empty", torch.zeros(0, 8)), ("ids", torch.arange(1000, dtype=torch.int64))]
    return [(name, t.to(device)) for name, t in named]


def digest(named: list[tuple[str, torch.Tensor]]) -> dict[str, str]:
    return {name: hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8)
                                 .numpy().tobytes()).hexdigest() if t.numel() else "empty"
            for name, t in named}


def receive(info_file: Path, device: str) -> None:
    info = json.loads(info_file.read_text())
    handles = pickle.loads(base64.b64decode(info["ipc_handles_pickled"]))
    got = open_shared(info["names"], info["dtype_names"], info["shapes"], handles, device)
    print(json.dumps(digest(got)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--receive", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda:0" if args.device == "cuda" else "cpu"
    if args.receive is not None:
        receive(args.receive, device)
        return 0
    owner = f"ipc-check-{Path(tempfile.mkdtemp()).name}"
    named = tensors(device)
    try:
        kept, handles = share(named, segment_path(owner, 1))  # kept alive until the child is done
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(IPCWeightTransfer.update_info(named, handles), f)
        child = subprocess.run([sys.executable, __file__, "--device", args.device,
                                "--receive", f.name], capture_output=True, text=True,
                               check=False, timeout=300)
        del kept
    finally:
        remove_segments(owner)
    if child.returncode:
        print(f"FAIL ipc ({args.device}): the receiving process failed:\n{child.stderr[-2000:]}")
        return 1
    mine, theirs = digest(named), json.loads(child.stdout.strip().splitlines()[-1])
    bad = sorted(n for n in mine if mine[n] != theirs.get(n))
    size = sum(t.numel() * t.element_size() for _, t in named) / 2**20
    if bad:
        print(f"FAIL ipc ({args.device}): {', '.join(bad)} differ in the receiving process")
        return 1
    print(f"ok   ipc ({args.device}): {len(named)} tensors, {size:.1f} MiB, bit-exact in "
          "another process")
    return 0


if __name__ == "__main__":
    sys.exit(main())

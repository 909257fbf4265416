"""One rank of a megatron-core conformance run (tests/megatron): ``python -m
tests.megatron._worker RANK WORLD_SIZE TP EP WORKDIR``.

Builds the tiny example's HF Qwen3-MoE (seed 0), the Megatron model on this rank's shard,
computes per-token log-probs / entropies with both, exports the Megatron shards back to HF
weights and saves it all to WORKDIR/rank{RANK}.pt.
Rendezvous: ``file://WORKDIR/rendezvous`` over gloo (loopback only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 12


def launch(module: str, world_size: int, args: Sequence[str], workdir: Path,
           timeout: float = 300.0) -> list[Any]:
    """Run ``python -m module RANK WORLD_SIZE *args`` for every rank (one thread each) and
    return each rank's ``workdir/rank{r}.pt``; a failed rank fails with its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", module, str(r), str(world_size), *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world_size)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{outputs[r][-4000:]}"
    return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def tiny_hf_policy(seed: int = 0, layers: int | None = None, tie: bool = False) -> Any:
    """The examples/tiny architecture as an HF Qwen3MoeForCausalLM with random weights
    (``layers``: that many decoder layers instead of the example's 2; ``tie``: tied
    embeddings)."""
    from runtime.policy import build_policy, build_tokenizer

    spec = yaml.safe_load((REPO / "examples" / "tiny" / "spec.yaml").read_text(encoding="utf-8"))
    arch = spec["model"]["architecture"]
    if layers is not None:
        arch["num_layers"] = layers
    if tie:
        arch["tie_embeddings"] = True
    return build_policy(arch, build_tokenizer(int(arch["vocab_size"])), seed).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences: full, right-padded (last 3 pad), left-padded (first 3 pad)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 64, (3, SEQ_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, :3] = 0
    ids[mask == 0] = 0
    return ids, mask


def scored(mask: torch.Tensor) -> torch.Tensor:
    """Positions that carry a log-prob: a real token whose predecessor is real."""
    m = mask.bool()
    out = torch.zeros_like(m)
    out[:, 1:] = m[:, 1:] & m[:, :-1]
    return out


def run(rank: int, world_size: int, tp: int, ep: int, workdir: Path) -> dict[str, torch.Tensor]:
    """Both models' log-probs and entropies on :func:`batch` for this rank (applies the CPU
    patches, for the worker processes; idempotent under the ``megatron_cpu`` fixture)."""
    from runtime.megatron.cpu import enable_cpu

    enable_cpu()
    from runtime.megatron.hf_weights import gather_full_state_dict, load_hf_weights, megatron_to_hf
    from runtime.megatron.logprobs import megatron_logprobs
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.trainer import sequence_logprobs

    torch.manual_seed(0)
    hf = tiny_hf_policy()
    pg = init_parallel(rank, world_size, workdir / "rendezvous", tp=tp, ep=ep)
    try:
        model = build_gpt_model(hf.config, pg, tp=tp, ep=ep)
        load_hf_weights(model, hf.state_dict(), hf.config)
        model.eval()
        ids, mask = batch()
        with torch.no_grad():
            ref, ref_h = sequence_logprobs(hf, ids, mask, with_entropy=True)
            got, got_h = megatron_logprobs(model, ids, mask, with_entropy=True)
        assert ref_h is not None and got_h is not None
        exported = megatron_to_hf(gather_full_state_dict(model), hf.config)
        return {"ref": ref, "ref_h": ref_h, "got": got, "got_h": got_h, "mask": scored(mask),
                "hf": hf.state_dict(), "exported": exported}
    finally:
        destroy_parallel()


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    rank, world_size, tp, ep = (int(a) for a in argv[:4])
    workdir = Path(argv[4])
    torch.set_num_threads(1)
    torch.save(run(rank, world_size, tp, ep, workdir), workdir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])

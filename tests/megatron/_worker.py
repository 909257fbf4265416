"""One rank of a megatron-core conformance run (tests/megatron): ``python -m
tests.megatron._worker RANK WORLD_SIZE TP EP WORKDIR``.

Builds the tiny example's HF Qwen3-MoE (seed 0), the Megatron model on this rank's shard,
computes per-token log-probs / entropies with both and saves them to WORKDIR/rank{RANK}.pt.
Rendezvous: ``file://WORKDIR/rendezvous`` over gloo (loopback only).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 12


def tiny_hf_policy(seed: int = 0) -> Any:
    """The examples/tiny architecture as an HF Qwen3MoeForCausalLM with random weights."""
    from runtime.policy import build_policy, build_tokenizer

    spec = yaml.safe_load((REPO / "examples" / "tiny" / "spec.yaml").read_text(encoding="utf-8"))
    arch = spec["model"]["architecture"]
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
    from runtime.megatron import model as mm
    from runtime.trainer import sequence_logprobs

    torch.manual_seed(0)
    hf = tiny_hf_policy()
    pg = mm.init_parallel(rank, world_size, workdir / "rendezvous", tp=tp, ep=ep)
    try:
        model = mm.build_gpt_model(hf.config, pg, tp=tp, ep=ep)
        mm.load_hf_weights(model, hf.state_dict(), hf.config)
        model.eval()
        ids, mask = batch()
        with torch.no_grad():
            ref, ref_h = sequence_logprobs(hf, ids, mask, with_entropy=True)
            got, got_h = mm.megatron_logprobs(model, ids, mask, with_entropy=True)
        assert ref_h is not None and got_h is not None
        return {"ref": ref, "ref_h": ref_h, "got": got, "got_h": got_h, "mask": scored(mask)}
    finally:
        mm.destroy_parallel()


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    rank, world_size, tp, ep = (int(a) for a in argv[:4])
    workdir = Path(argv[4])
    torch.set_num_threads(1)
    torch.save(run(rank, world_size, tp, ep, workdir), workdir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])

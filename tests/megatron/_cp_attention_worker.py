"""One CP rank of the context-parallel attention check (tests/megatron/test_sdpa_attention.py):
``python -m tests.megatron._cp_attention_worker RANK WORLD_SIZE WORKDIR``.

Every rank draws the same whole-sequence query, key, value and output gradient; it runs
``SDPAttention`` on its own positions (``runtime.megatron.context_parallel.split``: chunks r
and 2·CP−1−r) and compares output and input gradients with the whole-sequence attention of
megatron's local module (scores masked with −10000, softmax, values: computed here) restricted
to its rows. Cases: GQA causal without a mask, GQA with a left/right padding mask (rows
restricted to the local queries, as ``runtime.megatron.logprobs`` passes it under CP), MLA-shaped heads
(hn ≠ hv, MLA's softmax scale). Saves the largest relative errors to WORKDIR/rank{RANK}.pt.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               scale: float) -> torch.Tensor:
    """megatron's local core attention on the whole sequence: [s, b, n, d] → [s, b, n · hv]."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) * scale
    probs = scores.masked_fill(mask, -10000.0).softmax(-1)
    out = torch.einsum("bnst,tbnd->sbnd", probs, v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _case(pg: Any, *, heads: int, groups: int, hn: int, hv: int, padded: bool,
          mla: bool) -> float:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from runtime.megatron import context_parallel as cp
    from runtime.megatron.attention import SDPAttention
    from runtime.megatron.logprobs import _padding_mask

    s, b = 16, 2
    config = TransformerConfig(num_layers=2, hidden_size=heads * hn, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=hn, attention_dropout=0.0,
                               masked_softmax_fusion=False, use_cpu_initialization=True,
                               context_parallel_size=2)
    scale = 0.7 / math.sqrt(hn) if mla else 1.0 / math.sqrt(hn)
    extra = dict(k_channels=hn, v_channels=hv, softmax_scale=scale) if mla else {}
    attn = SDPAttention(config, layer_number=2, attn_mask_type=AttnMaskType.causal,
                        attention_type="self", pg_collection=pg, **extra)
    g = torch.Generator().manual_seed(heads * 100 + hv + padded)
    q, k = (torch.randn(s, b, n, hn, generator=g) for n in (heads, groups))
    v = torch.randn(s, b, groups, hv, generator=g)
    grad = torch.randn(s, b, heads * hv, generator=g)
    keep = torch.ones(b, s, dtype=torch.long)
    if padded:
        keep[0, -5:] = 0  # right-padded
        keep[1, :3] = 0  # left-padded: its first rows attend to nothing
    full_mask = _padding_mask(keep)  # [b, 1, s, s], True = masked

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _reference(*leaves, full_mask, scale)
    (want * grad).sum().backward()
    rows = cp.local_positions(s)
    local = [cp.split(t, 0).requires_grad_() for t in (q, k, v)]
    mask = full_mask.index_select(2, rows) if padded else None
    got = attn(*local, mask)
    (got * cp.split(grad, 0)).sum().backward()
    errors = [(got - cp.split(want, 0)).abs().max() / want.abs().max().clamp(min=1)]
    for mine, whole in zip(local, leaves, strict=True):
        ref = cp.split(whole.grad, 0)
        errors.append((mine.grad - ref).abs().max() / ref.abs().max().clamp(min=1))
    return float(max(errors))


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    rank, world = int(argv[0]), int(argv[1])
    workdir = Path(argv[2])
    torch.set_num_threads(1)
    from runtime.megatron.cpu import enable_cpu

    enable_cpu()
    from runtime.megatron.parallel import destroy_parallel, init_parallel

    pg = init_parallel(rank, world, workdir / "rendezvous", cp=world)
    try:
        out = {"gqa": _case(pg, heads=4, groups=2, hn=8, hv=8, padded=False, mla=False),
               "gqa-padded": _case(pg, heads=4, groups=2, hn=8, hv=8, padded=True, mla=False),
               "mla": _case(pg, heads=4, groups=4, hn=12, hv=8, padded=False, mla=True)}
    finally:
        destroy_parallel()
    torch.save(out, workdir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])

"""``bench/gpu.py``'s ``local_attention`` section: one layer's core attention, megatron-core's
local ``DotProductAttention`` against the trainer's SDPA module, memory and time."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import gpu_device as dev
from bench.gpu_device import peak_memory, release, reset_peak_memory, sync


def _attention_memory(attn: Any, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype,
                      mask: torch.Tensor | None, reps: int = 3) -> dict[str, Any]:
    """One core attention's forward + backward on fresh q, k, v: bytes kept after the forward
    (its output excluded), peak bytes above the inputs in the forward and in the backward,
    the output and q-gradient (for a comparison), and the median time of ``reps`` calls."""
    times: list[float] = []
    row: dict[str, Any] = {}
    for i in range(reps + 1):
        g = torch.Generator(device=dev.DEVICE).manual_seed(0)
        q, k, v = (torch.randn(*shape, device=dev.DEVICE, dtype=dtype, generator=g)
                   .requires_grad_() for shape in shapes)
        sync()
        base = dev.allocated()
        reset_peak_memory()
        start = time.perf_counter()
        out = attn(q, k, v, mask)
        sync()
        kept = (dev.allocated()) - base
        kept -= out.numel() * out.element_size()
        forward_peak = peak_memory() - base
        reset_peak_memory()
        before = dev.allocated()
        out.backward(torch.ones_like(out))
        sync()
        times.append(time.perf_counter() - start)
        if i == reps:  # the first calls allocate megatron's persistent score buffer
            row = dict(kept=kept, forward_peak=forward_peak,
                       backward_peak_above_kept=peak_memory() - before,
                       out=out.detach().float(), dq=q.grad.float())  # type: ignore[union-attr]
        del q, k, v, out
    row["ms"] = 1e3 * statistics.median(times[1:])
    return row


def local_attention(emit: Callable[..., None], seq: int = 4096, heads: int = 8,
                    head_dim: int = 128) -> None:
    """Core attention for one layer, bf16: megatron-core's local DotProductAttention (what the
    Megatron trainer built before) against compiler.estimates.local_attention_bytes, and the
    trainer's SDPA module (runtime.megatron.attention.SDPAttention) against the estimate's 0:
    bytes kept after the forward pass and peak bytes above the inputs during forward and
    backward, per score element b · heads · s², and forward + backward time.

    Cases: GQA (heads / 4 KV heads) with megatron's full causal mask — local and SDPA (its
    memory-efficient kernel with the cached additive mask) — and without a mask (SDPA causal,
    flash: what the trainer runs for right-padded batches); MLA-shaped (q/k 192, v 128) SDPA
    causal; then SDPA alone at 4 × and 8 × the sequence length, where local attention would
    need 16 × and 64 × its score memory. Outputs of SDPA and local are compared (max |Δ|)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from compiler.estimates import _LOCAL_ATTENTION_BYTES
    from runtime.megatron.attention import SDPAttention
    from runtime.megatron.logprobs import _padding_mask
    from runtime.megatron.parallel import init_parallel, use_devices

    backend, _ = use_devices("gpu" if dev.DEVICE == "cuda" else "cpu")
    rendezvous = Path(tempfile.mkdtemp(prefix="rlspec-gpu-")) / "rendezvous"
    pg = init_parallel(0, 1, rendezvous, backend=backend, seed=1234)
    if dev.DEVICE == "cpu":
        seq, heads, head_dim = 64, 4, 16
    kv = max(1, heads // 4)
    dtype = torch.bfloat16 if dev.DEVICE == "cuda" else torch.float32

    def config(kv_channels: int) -> Any:
        return TransformerConfig(num_layers=1, hidden_size=heads * kv_channels,
                                 num_attention_heads=heads, num_query_groups=kv,
                                 kv_channels=kv_channels, attention_dropout=0.0,
                                 hidden_dropout=0.0, bf16=dev.DEVICE == "cuda",
                                 params_dtype=torch.bfloat16, masked_softmax_fusion=False,
                                 use_cpu_initialization=True)

    def build(cls: type, **kw: Any) -> Any:
        return cls(config(kw.pop("kv_channels", head_dim)), layer_number=1,
                   attn_mask_type=AttnMaskType.causal, attention_type="self",
                   pg_collection=pg, **kw)

    def report(name: str, s: int, row: dict[str, Any], estimate: Any, **extra: Any) -> None:
        elements = heads * s * s
        emit(section="local_attention", attention=name, seq=s, heads=heads, kv_heads=kv,
             dtype=str(dtype), kept_per_element=row["kept"] / elements,
             forward_peak_per_element=row["forward_peak"] / elements,
             backward_peak_above_kept_per_element=row["backward_peak_above_kept"] / elements,
             kept_gb=row["kept"] / 1e9, forward_peak_gb=row["forward_peak"] / 1e9,
             ms_forward_backward=row["ms"], estimate_kept_working=estimate, **extra)

    def gqa(s: int) -> tuple[tuple[int, ...], ...]:
        return (s, 1, heads, head_dim), (s, 1, kv, head_dim), (s, 1, kv, head_dim)

    mask = _padding_mask(torch.ones(1, seq, dtype=torch.bool, device=dev.DEVICE))
    local = _attention_memory(build(DotProductAttention), gqa(seq), dtype, mask)
    report("local (mask)", seq, local, _LOCAL_ATTENTION_BYTES["bf16"])
    for name, m in (("sdpa (mask)", mask), ("sdpa (causal, no mask)", None)):
        row = _attention_memory(build(SDPAttention), gqa(seq), dtype, m)
        report(name, seq, row, (0, 0),
               max_abs_diff_vs_local=float((row["out"] - local["out"]).abs().max()),
               max_abs_diff_dq_vs_local=float((row["dq"] - local["dq"]).abs().max()),
               speedup_vs_local=local["ms"] / row["ms"])
    del local, mask
    mla = ((seq, 1, heads, 192), (seq, 1, heads, 192), (seq, 1, heads, 128))
    if dev.DEVICE == "cpu":
        mla = ((seq, 1, heads, 24), (seq, 1, heads, 24), (seq, 1, heads, 16))
    kv, full = heads, kv  # MLA: one KV head per query head
    row = _attention_memory(build(SDPAttention, kv_channels=mla[2][-1], k_channels=mla[0][-1],
                                  v_channels=mla[2][-1], softmax_scale=mla[0][-1] ** -0.5),
                            mla, dtype, None)
    report("sdpa mla (causal, no mask)", seq, row, (0, 0))
    kv = full
    for factor in (4, 8):
        s = seq * factor
        row = _attention_memory(build(SDPAttention), gqa(s), dtype, None, reps=2)
        report("sdpa (causal, no mask)", s, row, (0, 0))
        del row
        release()
    release()

"""The Megatron trainer's core attention (``runtime.megatron.attention.SDPAttention``, torch
SDPA) against megatron-core 0.16.1's local ``DotProductAttention`` it replaces.

fp32 on the CPU (SDPA's math backend): the module alone within 1e-6 (outputs and gradients,
relative to their largest magnitude where it exceeds 1)
for GQA, MLA-shaped heads (hn ≠ hv), causal without a mask, causal ∧ padding masks (right
and left padded, a left-padded row's fully masked positions included); whole models (Qwen3-MoE
and DeepSeek-V3 / MLA) give the same log-probs and gradients with either core attention.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.megatron._worker import batch, scored, tiny_hf_policy

pytestmark = pytest.mark.megatron

TOL = 1e-6


@pytest.fixture
def parallel(megatron_cpu: None, tmp_path: Path) -> Iterator[Any]:
    from runtime.megatron.parallel import destroy_parallel, init_parallel

    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        yield pg
    finally:
        destroy_parallel()


def _config(heads: int, groups: int, kv_channels: int, **kw: Any) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=heads * kv_channels,
                             num_attention_heads=heads, num_query_groups=groups,
                             kv_channels=kv_channels, attention_dropout=0.0,
                             masked_softmax_fusion=False, use_cpu_initialization=True, **kw)


def _pair(pg: Any, config: Any, **kw: Any) -> tuple[Any, Any]:
    """(local, SDPA) core attention of layer 2, built the way the attention layers build them."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from runtime.megatron.attention import SDPAttention
    from runtime.megatron.deepseek import MLADotProductAttention

    args = dict(config=config, layer_number=2, attn_mask_type=AttnMaskType.causal,
                attention_type="self", pg_collection=pg, **kw)
    local = MLADotProductAttention if "k_channels" in kw else DotProductAttention
    return local(**args), SDPAttention(**args)


def _padding_mask(s: int) -> torch.Tensor:
    """[3, 1, s, s], True = masked: full, right-padded (last 3), left-padded (first 3) rows."""
    keep = torch.ones(3, s, dtype=torch.bool)
    keep[1, -3:] = False
    keep[2, :3] = False
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return ~(causal[None] & keep[:, None, :])[:, None]


def _causal_mask(b: int, s: int) -> torch.Tensor:
    return ~torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s)


def _qkv(s: int, b: int, heads: int, groups: int, hn: int, hv: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(s, b, heads, hn), (s, b, groups, hn), (s, b, groups, hv)]
    return [torch.randn(*shape, generator=g).requires_grad_() for shape in shapes]


def _run(module: Any, qkv: list[torch.Tensor], mask: torch.Tensor | None,
         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = [t.detach().clone().requires_grad_() for t in qkv]
    out = module(*inputs, mask)
    g = torch.Generator().manual_seed(1)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), [t.grad for t in inputs]  # type: ignore[misc]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """max |Δ| ≤ 1e-6 · max(1, max |want|) (gradients reach ~10: fp32 summation order)."""
    scale = max(1.0, want.abs().max().item())
    diff = (got - want).abs().max().item()
    assert diff <= TOL * scale, f"{what}: max |Δ| = {diff:.3g} (scale {scale:.3g})"


SHAPES = {  # heads, groups, hn, hv, extra constructor args
    "gqa": (8, 2, 16, 16, {}),
    "mha": (4, 4, 16, 16, {}),
    "mla": (4, 4, 24, 16, {"softmax_scale": 0.7 / math.sqrt(24), "k_channels": 24,
                          "v_channels": 16}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("masking", ["causal", "causal-mask", "padding"])
def test_sdpa_equals_the_local_attention(parallel: Any, shape: str, masking: str) -> None:
    heads, groups, hn, hv, kw = SHAPES[shape]
    s, b = 10, 3
    local, sdpa = _pair(parallel, _config(heads, groups, hv), **kw)  # kv_channels: hv (MLA)
    assert sdpa.softmax_scale == pytest.approx(kw.get("softmax_scale", 1 / math.sqrt(hn)))
    qkv = _qkv(s, b, heads, groups, hn, hv)
    mask = {"causal": _causal_mask(b, s), "causal-mask": _causal_mask(b, s),
            "padding": _padding_mask(s)}[masking]
    want, want_grads = _run(local, qkv, mask)
    got, got_grads = _run(sdpa, qkv, None if masking == "causal" else mask)
    assert got.shape == (s, b, heads * hv)
    _assert_close(got, want, "output")
    for name, a, w in zip("qkv", got_grads, want_grads, strict=True):
        _assert_close(a, w, f"d{name}")


def test_layer_scaling_and_fp32_softmax_keep_the_effective_scale(parallel: Any) -> None:
    """apply_query_key_layer_scaling divides the local scores by the layer number and the
    softmax multiplies them back: the same function, the scale SDPA is given."""
    config = _config(4, 2, 16, apply_query_key_layer_scaling=True,
                     attention_softmax_in_fp32=True)
    local, sdpa = _pair(parallel, config)
    assert local.softmax_scale == pytest.approx(1 / math.sqrt(16) / 2)
    assert sdpa.softmax_scale == pytest.approx(1 / math.sqrt(16))
    qkv = _qkv(6, 2, 4, 2, 16, 16)
    mask = _padding_mask(6)[:2]
    _assert_close(_run(sdpa, qkv, mask)[0], _run(local, qkv, mask)[0], "output")


def test_one_additive_mask_per_boolean_mask(parallel: Any) -> None:
    """Every layer gets the same converted mask (the backward keeps one copy), aligned rows,
    fully masked rows (left padding) unmasked."""
    from runtime.megatron.attention import additive_mask

    mask = _padding_mask(10)
    a, dead = additive_mask(mask, torch.float32)
    assert additive_mask(mask, torch.float32)[0] is a
    assert a.shape == mask.shape and a.stride(-2) % 16 == 0
    assert dead is not None and dead[:, 0, :, 0].nonzero().tolist() == [[2, 0], [2, 1], [2, 2]]
    assert torch.equal(a[2, 0, 0], torch.zeros(10))  # position 0 of the left-padded row
    assert torch.equal(a.isinf(), mask & ~mask.all(-1, keepdim=True))
    assert additive_mask(_causal_mask(2, 4), torch.float32)[1] is None
    mask[0, 0, 0, 0] = True  # changed in place: converted again
    assert additive_mask(mask, torch.float32)[0] is not a


def test_unsupported_settings_are_refused(parallel: Any) -> None:
    from megatron.core.transformer.enums import AttnMaskType

    from runtime.megatron.attention import SDPAttention

    with pytest.raises(NotImplementedError, match="dropout"):
        SDPAttention(_config(4, 2, 16), 1, AttnMaskType.causal, "self", attention_dropout=0.1,
                     pg_collection=parallel)


# --------------------------------------------------------------------------- whole models


def _logprobs(hf: Any, pg: Any, ids: torch.Tensor, mask: torch.Tensor, local: bool,
              monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs and parameter gradients (of Σ scored logp) of the Megatron model, with the
    SDPA core attention or megatron-core's local one (given megatron's full boolean mask: the
    local module's own causal mask is a CUDA tensor)."""
    from runtime.megatron import attention, logprobs
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.model import build_gpt_model

    with monkeypatch.context() as mp:
        if local:
            mp.setattr(attention, "sdpa_layer_spec", lambda spec: spec)
            mp.setattr(logprobs, "_attention_mask", logprobs._padding_mask)
        model = build_gpt_model(hf.config, pg)
        core = model.decoder.layers[0].self_attention.core_attention
        assert isinstance(core, attention.SDPAttention) != local
        load_hf_weights(model, hf.state_dict(), hf.config)
        logp, _ = logprobs.megatron_logprobs(model, ids, mask)
        logp[scored(mask)].sum().backward()
    return logp.detach(), {n: p.grad for n, p in model.named_parameters()}  # type: ignore[misc]


def _right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = batch()
    return ids[:2], mask[:2]  # full, right-padded: the trainer's batches (no mask passed)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("padding", ["left-and-right", "right"])
def test_model_logprobs_and_gradients_equal_the_local_attention(
        parallel: Any, monkeypatch: pytest.MonkeyPatch, family: str, padding: str) -> None:
    from tests.families import tiny_deepseek_policy

    hf = tiny_hf_policy() if family == "qwen3_moe" else tiny_deepseek_policy()
    ids, mask = batch() if padding == "left-and-right" else _right_padded()
    want, want_grads = _logprobs(hf, parallel, ids, mask, True, monkeypatch)
    got, got_grads = _logprobs(hf, parallel, ids, mask, False, monkeypatch)
    real = mask.bool()  # right padding: padded positions attend differently (never read)
    diff = (got - want)[real].abs().max().item()
    assert diff <= 1e-5, f"max |Δ logp| = {diff:.3g}"
    scale = max(g.abs().max().item() for g in want_grads.values())
    for name, g in got_grads.items():
        d = (g - want_grads[name]).abs().max().item()
        assert d <= 1e-5 * scale, f"{name}: max |Δ grad| = {d:.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------- context parallel


def test_context_parallel_2_equals_whole_sequence_attention(tmp_path: Path) -> None:
    """CP = 2 (two gloo ranks, ``runtime.megatron.context_parallel``): each rank's queries —
    chunks r and 3 − r of four — against the all-gathered keys and values, masked by global
    position, equal the whole sequence's causal attention restricted to those rows, and the
    input gradients (K and V: summed over both ranks' queries, i.e. reduce-scattered) equal the
    whole-sequence gradients' rows: GQA without a mask and with padding masks (left-padded
    rows that see no key included), MLA-shaped heads (hn ≠ hv, MLA's softmax scale)."""
    from tests.megatron._worker import launch

    outs = launch("tests.megatron._cp_attention_worker", 2, [str(tmp_path)], tmp_path)
    for out in outs:
        assert set(out) == {"gqa", "gqa-padded", "mla"}
        for case, err in out.items():
            assert err <= TOL, (case, err)

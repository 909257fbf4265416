"""DeepSeek-V3 / Moonlight (``family: deepseek_v3``) on megatron-core: MLA (with and without
q_lora_rank), the sigmoid router with its selection bias and group limit, a shared expert and
a leading dense layer, against HF ``DeepseekV3ForCausalLM`` of the same weights.

Tolerance: fp32 on CPU, max |Δ logp| ≤ 1e-4 and max |Δ entropy| ≤ 1e-4 over every scored
position, gradients max |Δ| ≤ 1e-4 · max |g| (measured ≈ 1e-6: summation order only). The
weight conversion HF → Megatron → HF is exact, bit for bit.

MLA runs on the CPU with the local (non-TransformerEngine) spec once
``runtime.megatron.deepseek.mla_layer_spec`` supplies its core attention (module doc there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.families import tiny_deepseek_policy
from tests.megatron._match import check_against_hf, check_sigmoid_r3
from tests.megatron._worker import batch

pytestmark = pytest.mark.megatron


def test_conversion_round_trip_is_exact() -> None:
    """HF → Megatron → HF, for both query layouts and without a shared expert."""
    from runtime.megatron.hf_weights import hf_to_megatron, megatron_to_hf

    for kw in ({}, {"q_lora_rank": None}):
        hf = tiny_deepseek_policy(**kw)
        sd = hf.state_dict()
        full = hf_to_megatron(sd, hf.config)
        assert "decoder.layers.1.mlp.router.expert_bias" in full
        assert "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in full
        back = megatron_to_hf(full, hf.config)
        assert back.keys() == sd.keys()
        for key, value in sd.items():
            assert torch.equal(back[key], value), key


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q-lora", "full-rank-q"])
def test_logprobs_gradients_and_export_match_hf(tmp_path: Path, q_lora_rank: int | None) -> None:
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel

    hf = tiny_deepseek_policy(q_lora_rank=q_lora_rank)
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg)
        assert model.config.multi_latent_attention and model.config.moe_layer_freq == [0, 1]
        load_hf_weights(model, hf.state_dict(), hf.config)
        check_against_hf(hf, model)
        assert model.decoder.layers[1].mlp.router.weight.grad.abs().sum() > 0
    finally:
        destroy_parallel()


@pytest.mark.usefixtures("megatron_cpu")
def test_r3_with_the_sigmoid_router_replays_the_recorded_experts(tmp_path: Path) -> None:
    """megatron-core's RouterReplay with the sigmoid router: its record is HF's choice (bias
    and group limit included); after the router weights and the selection bias change, the
    replay routes to the recorded experts and gives the same log-probs as the embedded
    replay of HF (gates from the live sigmoid scores, renormalised, · 2.5), and the router
    weight gets a gradient (``tests.megatron._match.check_sigmoid_r3``)."""
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.router_replay import patch_deepseek_v3

    hf = tiny_deepseek_policy()
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg, routing_replay=True)
        load_hf_weights(model, hf.state_dict(), hf.config)
        model.eval()
        check_sigmoid_r3(hf, model, patch_deepseek_v3)
    finally:
        destroy_parallel()


@pytest.mark.usefixtures("megatron_cpu")
def test_the_selection_bias_takes_deepseeks_update(tmp_path: Path) -> None:
    """The bias is a buffer (no gradient); megatron-core's update after an optimizer step
    (``finalize_model_grads``) moves it by ±rate against each expert's load: b += rate ·
    sign(mean − tokens), tokens counting the real tokens only (padding and the dummy rows that
    even out micro-batches would lower the bias of the experts they are routed to). The RL
    job passes rate 1e-3 for ``moe.expert_bias: true``
    (``runtime.megatron.args.bias_update_rate``); at rate 0 the checkpoint's bias stays."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.logprobs import megatron_logprobs
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel

    hf = tiny_deepseek_policy()
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        for rate in (1e-3, 0.0):
            model = build_gpt_model(hf.config, pg, moe_router_bias_update_rate=rate)
            load_hf_weights(model, hf.state_dict(), hf.config)
            router = model.decoder.layers[1].mlp.router
            before = router.expert_bias.clone()
            assert not router.expert_bias.requires_grad
            ids, mask = batch()
            real = int(mask.sum())
            # plus a dummy row (pad_rows: one attended token), which the routers skip too
            ids = torch.cat([ids, torch.zeros_like(ids[:1])])
            mask = torch.cat([mask, torch.zeros_like(mask[:1])])
            mask[-1, 0] = 1
            megatron_logprobs(model, ids, mask)[0].sum().backward()
            tokens = router.local_tokens_per_expert.clone()
            assert tokens.sum() == real * 2  # top-2 of every real token, not padding
            _update_router_expert_bias([model], model.config)
            step = torch.sign(tokens.mean() - tokens) * rate
            assert torch.equal(router.expert_bias, before + step)
            assert (rate == 0) == torch.equal(router.expert_bias, before)
    finally:
        destroy_parallel()

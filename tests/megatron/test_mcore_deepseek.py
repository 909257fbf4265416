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
from typing import Any

import pytest
import torch

from tests.families import tiny_deepseek_policy
from tests.megatron._worker import batch, scored

pytestmark = pytest.mark.megatron

ATOL = 1e-4


def test_conversion_round_trip_is_exact() -> None:
    """HF → Megatron → HF, for both query layouts and without a shared expert."""
    from runtime.megatron import model as mm

    for kw in ({}, {"q_lora_rank": None}):
        hf = tiny_deepseek_policy(**kw)
        sd = hf.state_dict()
        full = mm.hf_to_megatron(sd, hf.config)
        assert "decoder.layers.1.mlp.router.expert_bias" in full
        assert "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in full
        back = mm.megatron_to_hf(full, hf.config)
        assert back.keys() == sd.keys()
        for key, value in sd.items():
            assert torch.equal(back[key], value), key


def _gate_ids(hf: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []

    def keep(_m: Any, _i: Any, out: tuple[torch.Tensor, ...]) -> None:
        got.append(out[2].detach().clone())

    hooks = [layer.mlp.gate.register_forward_hook(keep)
             for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    try:
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q-lora", "full-rank-q"])
def test_logprobs_gradients_and_export_match_hf(tmp_path: Path, q_lora_rank: int | None) -> None:
    from runtime.megatron import model as mm
    from runtime.trainer import sequence_logprobs

    hf = tiny_deepseek_policy(q_lora_rank=q_lora_rank)
    pg = mm.init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = mm.build_gpt_model(hf.config, pg)
        assert model.config.multi_latent_attention and model.config.moe_layer_freq == [0, 1]
        mm.load_hf_weights(model, hf.state_dict(), hf.config)
        ids, mask = batch()
        m = scored(mask)
        ref, ref_h = sequence_logprobs(hf, ids, mask, with_entropy=True)
        got, got_h = mm.megatron_logprobs(model, ids, mask, with_entropy=True)
        assert ref_h is not None and got_h is not None
        d_logp = (got - ref)[m].abs().max().item()
        d_ent = (got_h - ref_h)[m].abs().max().item()
        assert d_logp <= ATOL, f"max |Δ logp| = {d_logp:.3g}"
        assert d_ent <= ATOL, f"max |Δ entropy| = {d_ent:.3g}"
        # gradients: HF's converted with hf_to_megatron equal megatron's
        ref[m].sum().backward()
        got[m].sum().backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                 for n, p in hf.named_parameters()}
        grads.update({n: torch.zeros_like(b) for n, b in hf.named_buffers()
                      if n.endswith("e_score_correction_bias")})
        want = mm.hf_to_megatron(grads, hf.config)
        scale = max(g.abs().max().item() for g in want.values())
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            diff = (p.grad - want[name]).abs().max().item()
            assert diff <= 1e-4 * scale, f"{name}: max |Δ grad| = {diff:.3g} (scale {scale:.3g})"
        router = model.decoder.layers[1].mlp.router
        assert router.weight.grad.abs().sum() > 0
        # export: the model's weights (and the selection bias buffer) back to HF, bit for bit
        exported = mm.megatron_to_hf(mm.gather_full_state_dict(model), hf.config)
        for key, value in hf.state_dict().items():
            assert torch.equal(exported[key], value), key
    finally:
        mm.destroy_parallel()


@pytest.mark.usefixtures("megatron_cpu")
def test_r3_with_the_sigmoid_router_replays_the_recorded_experts(tmp_path: Path) -> None:
    """megatron-core's RouterReplay with the sigmoid router: its record is HF's choice (bias
    and group limit included); after the router weights and the selection bias change, the
    replay routes to the recorded experts and gives the same log-probs as the embedded
    replay of HF (gates from the live sigmoid scores, renormalised, · 2.5), and the router
    weight gets a gradient."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from runtime.megatron import model as mm
    from runtime.megatron.replay import MegatronReplay, from_megatron_layout
    from runtime.router_replay import RoutingTrace, patch_deepseek_v3
    from runtime.trainer import sequence_logprobs

    hf = tiny_deepseek_policy()
    pg = mm.init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = mm.build_gpt_model(hf.config, pg, routing_replay=True)
        mm.load_hf_weights(model, hf.state_dict(), hf.config)
        model.eval()
        assert len(RouterReplay.global_router_replay_instances) == 1  # one MoE layer
        ids, mask = batch()
        b, t = ids.shape
        replay = MegatronReplay()
        with torch.no_grad(), replay.recording() as records:
            mm.megatron_logprobs(model, ids, mask)
        recorded = from_megatron_layout(records, b, t)  # [B, T, L, k]
        real = mask.bool()
        hf_ids = _gate_ids(hf, ids, mask)[0].view(b, t, -1)
        assert torch.equal(recorded[:, :, 0].sort(-1).values[real], hf_ids.sort(-1).values[real])

        # New router weights and selection bias, in both models alike.
        g = torch.Generator().manual_seed(5)
        delta = torch.randn(8, 64, generator=g)
        bias = torch.linspace(-1.0, 1.0, 8)
        with torch.no_grad():
            router = model.decoder.layers[1].mlp.router
            router.weight.add_(delta)
            router.expert_bias.copy_(bias)
            hf.model.layers[1].mlp.gate.weight.add_(delta)
            hf.model.layers[1].mlp.gate.e_score_correction_bias.copy_(bias)
        with torch.no_grad():
            free = _gate_ids(hf, ids, mask)[0].view(b, t, -1)
        assert not torch.equal(free.sort(-1).values[real], hf_ids.sort(-1).values[real])

        trace = RoutingTrace(recorded.to(torch.uint8), 8)
        used: list[torch.Tensor] = []
        hook = router.register_forward_hook(lambda _m, _i, out: used.append(out[1].clone()))
        model.zero_grad()
        with replay.replaying(trace):
            got, _ = mm.megatron_logprobs(model, ids, mask)
        hook.remove()
        want_map = torch.zeros(t * b, 8, dtype=torch.bool).scatter(
            1, recorded[:, :, 0].transpose(0, 1).reshape(t * b, -1), True)
        assert torch.equal(used[0], want_map)  # exactly the recorded experts
        group = patch_deepseek_v3(hf)
        with group.replaying(trace):
            ref, _ = sequence_logprobs(hf, ids, mask)
        m = scored(mask)
        d = (got - ref)[m].abs().max().item()
        assert d <= ATOL, f"replayed max |Δ logp| = {d:.3g}"
        got[m].sum().backward()
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        RouterReplay.clear_global_router_replay_action()
    finally:
        mm.destroy_parallel()


@pytest.mark.usefixtures("megatron_cpu")
def test_the_selection_bias_takes_deepseeks_update(tmp_path: Path) -> None:
    """The bias is a buffer (no gradient); megatron-core's update after an optimizer step
    (``finalize_model_grads``) moves it by ±rate against each expert's load: b += rate ·
    sign(mean − tokens). The RL job passes rate 1e-3 for ``moe.expert_bias: true``
    (``runtime.megatron.args.bias_update_rate``); at rate 0 the checkpoint's bias stays."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from runtime.megatron import model as mm

    hf = tiny_deepseek_policy()
    pg = mm.init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        for rate in (1e-3, 0.0):
            model = mm.build_gpt_model(hf.config, pg, moe_router_bias_update_rate=rate)
            mm.load_hf_weights(model, hf.state_dict(), hf.config)
            router = model.decoder.layers[1].mlp.router
            before = router.expert_bias.clone()
            assert not router.expert_bias.requires_grad
            ids, mask = batch()
            mm.megatron_logprobs(model, ids, mask)[0].sum().backward()
            tokens = router.local_tokens_per_expert.clone()
            assert tokens.sum() == ids.numel() * 2  # top-2 of every token
            _update_router_expert_bias([model], model.config)
            step = torch.sign(tokens.mean() - tokens) * rate
            assert torch.equal(router.expert_bias, before + step)
            assert (rate == 0) == torch.equal(router.expert_bias, before)
    finally:
        mm.destroy_parallel()

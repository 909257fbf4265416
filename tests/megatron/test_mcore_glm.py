"""GLM-4.5 (``family: glm4_moe``) on megatron-core: grouped-query attention with q/k/v biases
and RoPE on half of each head (``rotary_percent`` 0.5), DeepSeek-V3's sigmoid router with the
selection bias (and group limit), a shared expert and a leading dense layer, against HF
``Glm4MoeForCausalLM`` of the same weights (random q/k/v biases and selection bias, so a bias
on the wrong rows or a bias ignored shows).

Tolerance: fp32 on CPU, max |Δ logp| ≤ 1e-4 and max |Δ entropy| ≤ 1e-4 over every scored
position (measured ≈ 5e-7 and 1e-6), gradients max |Δ| ≤ 1e-4 · max |g|. The weight
conversion HF → Megatron → HF is exact, bit for bit. R3: the replayed experts are the recorded
ones after the router weights and the bias change, the log-probs equal the embedded replay of
HF, the router weight gets a gradient. R2 and R3 RL steps equal the embedded trainer's
(``tests.megatron._train_worker``, ``family=glm4_moe``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.families import tiny_glm_policy
from tests.megatron._match import check_against_hf, check_sigmoid_r3
from tests.megatron._worker import launch
from tests.megatron.test_mcore_trainer import _check

pytestmark = pytest.mark.megatron


KINDS = [{}, {"groups": True, "qk_norm": True}]
KIND_IDS = ["air-like", "group-limited-qk-norm"]  # GLM-4.5-Air has no q/k norm, GLM-4.5 has


@pytest.mark.parametrize("kw", KINDS, ids=KIND_IDS)
def test_conversion_round_trip_is_exact(kw: dict[str, Any]) -> None:
    """HF → Megatron → HF: the qkv biases, the q/k norms, the router's selection bias and the
    shared expert map to Megatron's names and back unchanged."""
    from runtime.megatron.hf_weights import hf_to_megatron, megatron_to_hf

    hf = tiny_glm_policy(**kw)
    sd = hf.state_dict()
    full = hf_to_megatron(sd, hf.config)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in full
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in full) == bool(kw)
    assert "decoder.layers.1.mlp.router.expert_bias" in full
    assert "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in full
    assert "decoder.layers.0.mlp.linear_fc1.weight" in full  # the leading dense layer
    back = megatron_to_hf(full, hf.config)
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize("kw", KINDS, ids=KIND_IDS)
def test_logprobs_gradients_and_export_match_hf(tmp_path: Path, kw: dict[str, Any]) -> None:
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel

    hf = tiny_glm_policy(**kw)
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg)
        cfg = model.config
        assert cfg.add_qkv_bias and cfg.qk_layernorm == bool(kw) and cfg.moe_layer_freq == [0, 1]
        assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk) == (
            (4, 1) if kw else (None, None))
        assert cfg.moe_router_score_function == "sigmoid" and cfg.moe_router_enable_expert_bias
        assert cfg.moe_router_topk_scaling_factor == 2.5
        # RoPE on half of each head: 16 · 0.5 = 8 dims, 4 frequencies
        assert model.rotary_pos_emb.inv_freq.numel() == 4
        load_hf_weights(model, hf.state_dict(), hf.config)
        check_against_hf(hf, model)
        assert model.decoder.layers[0].self_attention.linear_qkv.bias.grad.abs().sum() > 0
        assert model.decoder.layers[1].mlp.router.weight.grad.abs().sum() > 0
    finally:
        destroy_parallel()


@pytest.mark.usefixtures("megatron_cpu")
def test_r3_with_glms_router_replays_the_recorded_experts(tmp_path: Path) -> None:
    """megatron-core's RouterReplay with GLM-4.5's router: its record is HF's choice (the
    selection bias included); after the router weights and the bias change, the replay routes
    to the recorded experts, gives the log-probs of the embedded replay of HF (gates from the
    live sigmoid scores, renormalised, · 2.5), and the router weight gets a gradient
    (``tests.megatron._match.check_sigmoid_r3``)."""
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.router_replay import patch_glm4_moe

    hf = tiny_glm_policy()
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg, routing_replay=True)
        load_hf_weights(model, hf.state_dict(), hf.config)
        model.eval()
        check_sigmoid_r3(hf, model, patch_glm4_moe)
    finally:
        destroy_parallel()


@pytest.mark.parametrize(("replay", "loss"), [("r2", "espo"), ("r3", "grpo")])
def test_rl_step_with_router_replay_matches_embedded(tmp_path: Path, replay: str,
                                                     loss: str) -> None:
    """One RL step of GLM-4.5 (two PPO epochs × two optimizer steps) with R2 (experts recorded
    in the old-policy pass, replayed in the updates) or R3 (another policy's experts): the
    Megatron trainer's weights equal the embedded trainer's, and differ from the same step
    routing freely."""
    (out,) = launch("tests.megatron._train_worker", 1,
                    ["1", "1", str(tmp_path), replay, loss, "family=glm4_moe"], tmp_path)
    _check(_unrotated_key_bias_aside(out))


def _unrotated_key_bias_aside(out: dict[str, Any]) -> dict[str, Any]:
    """The step's weights with the k_proj bias of the dims RoPE leaves alone (the second half
    of each head) set to the embedded trainer's, after a looser check of them. Their gradient
    is zero in exact arithmetic: q · b_k is the same for every key, and softmax ignores a
    constant, so both trainers' gradients there are rounding noise (≈ 1e-9), which Adam
    scales to lr-sized steps of arbitrary sign (measured: up to 5e-5 apart, where the rotated
    half agrees to 3e-6)."""
    got = dict(out["got"])
    for key, value in got.items():
        if key.endswith("self_attn.k_proj.bias"):
            heads = value.view(-1, 16)  # head_dim 16: dims 8… are not rotated
            ref = out["ref"][key].view(-1, 16)
            assert (heads[:, 8:] - ref[:, 8:]).abs().max().item() <= 2e-4, key
            got[key] = torch.cat([heads[:, :8], ref[:, 8:]], 1).reshape(-1)
    return {**out, "got": got}


def test_tensor_and_expert_parallel_2_step_matches_embedded(tmp_path: Path) -> None:
    """TP = 2 with sequence parallelism and EP = 2 on two ranks: the q/k/v biases are split
    with their query groups, RoPE's half-rotary heads stay whole on a rank; R3's targets are
    sliced by sequence. The step equals the embedded trainer's."""
    outs = launch("tests.megatron._train_worker", 2,
                  ["2", "2", str(tmp_path), "r3", "grpo", "family=glm4_moe"], tmp_path)
    for out in outs:
        _check(_unrotated_key_bias_aside(out))

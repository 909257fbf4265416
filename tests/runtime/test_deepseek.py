"""The embedded DeepSeek-V3 / Moonlight policy (``family: deepseek_v3``): transformers'
DeepseekV3ForCausalLM built from the spec's architecture, saved and reloaded, and router replay
of its sigmoid router (``runtime.router_replay.patch_deepseek_v3``). GLM-4.5 (``family:
glm4_moe``, ``Glm4MoeForCausalLM``) has the same router (``patch_glm4_moe``): the checkpoint
and replay tests run on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.policy import (
    build_policy,
    build_tokenizer,
    count_parameters,
    load_policy,
    policy_config,
    save_policy,
)
from runtime.router_replay import patch_deepseek_v3, patch_glm4_moe, patch_moe_routers
from tests.families import tiny_deepseek_arch, tiny_deepseek_policy, tiny_glm_policy

# family → (tiny policy, its router's replay patch, HF class)
SIGMOID = {"deepseek_v3": (tiny_deepseek_policy, patch_deepseek_v3, "DeepseekV3ForCausalLM"),
           "glm4_moe": (tiny_glm_policy, patch_glm4_moe, "Glm4MoeForCausalLM")}
FAMILY = pytest.mark.parametrize("family", list(SIGMOID))


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 64, (3, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q-lora", "full-rank-q"])
def test_config_mapping(q_lora_rank: int | None) -> None:
    arch = tiny_deepseek_arch(q_lora_rank=q_lora_rank)
    cfg = policy_config(arch, build_tokenizer(64))
    assert type(cfg).__name__ == "DeepseekV3Config"
    assert (cfg.q_lora_rank, cfg.kv_lora_rank) == (q_lora_rank, 32)
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (32, 32, 32)
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 2
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)
    assert (cfg.n_shared_experts, cfg.first_k_dense_replace) == (1, 1)
    assert (cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group) == (2.5, 4, 1)
    assert cfg.norm_topk_prob is True and cfg.rope_interleave is True
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    model = build_policy(arch, build_tokenizer(64), 0)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj is None) == (q_lora_rank is not None)
    assert not hasattr(model.model.layers[0].mlp, "gate")  # the leading dense layer
    assert model.model.layers[1].mlp.shared_experts.gate_proj.out_features == 32
    counts = count_parameters(model)
    per_expert = 3 * 64 * 32
    assert counts["expert"] == 8 * per_expert
    assert counts["active"] == counts["total"] - 6 * per_expert  # 6 of 8 experts idle
    # without groups: n_group = topk_group = 1 (no group limit)
    flat = policy_config(tiny_deepseek_arch(groups=False), build_tokenizer(64))
    assert (flat.n_group, flat.topk_group) == (1, 1)


@pytest.mark.parametrize(("edit", "match"), [
    ({"attention": "gqa", "mla": None}, "multi-head latent attention"),
    ({"moe": None}, "needs a model.architecture.moe"),
    ({"moe": {"score_function": "softmax"}}, "routes with sigmoid"),
    ({"moe": {"shared_expert_ffn_hidden_size": 48}}, "shared-expert MLP"),
])
def test_config_rejects(edit: dict[str, Any], match: str) -> None:
    arch = tiny_deepseek_arch()
    for key, value in edit.items():
        if isinstance(value, dict):
            arch[key] = {**arch[key], **value}
        else:
            arch[key] = value
    with pytest.raises(ValueError, match=match):
        policy_config(arch, build_tokenizer(64))


def test_qwen3_moe_rejects_deepseek_routing_fields() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    arch = yaml.safe_load((root / "examples/tiny/spec.yaml").read_text())["model"]["architecture"]
    for extra, match in (({"routed_scaling_factor": 2.0}, "scale"),
                         ({"num_groups": 2, "group_top_k": 1}, "group-limited")):
        with pytest.raises(ValueError, match=match):
            policy_config({**arch, "moe": {**arch["moe"], **extra}}, build_tokenizer(64))


@FAMILY
def test_save_load_identical_logits(tmp_path: Path, family: str) -> None:
    policy, _, cls = SIGMOID[family]
    model = policy()
    tok = build_tokenizer(64)
    save_policy(model, tok, tmp_path / "ckpt")
    loaded, _ = load_policy(tmp_path / "ckpt")
    assert type(loaded).__name__ == cls
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    bias = loaded.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(bias, model.model.layers[1].mlp.gate.e_score_correction_bias)
    assert bias.abs().sum() > 0  # the selection bias travels with the checkpoint


def _routed(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor],
                                                    list[torch.Tensor]]:
    """(logits, each router's selected ids, each router's gates) of one forward."""
    picked: list[torch.Tensor] = []
    gates: list[torch.Tensor] = []

    def keep(_m: Any, _i: Any, out: tuple[torch.Tensor, ...]) -> None:
        picked.append(out[2].detach().clone())
        gates.append(out[1])

    hooks = [layer.mlp.gate.register_forward_hook(keep)
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    try:
        logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, picked, gates


@FAMILY
def test_record_then_replay_is_bitwise_the_normal_forward(family: str) -> None:
    policy, patch, _ = SIGMOID[family]
    model = policy()
    group = patch(model)
    assert len(group) == 1  # one MoE layer after the leading dense one
    ids = _ids()
    with torch.no_grad():
        free, free_ids, free_gates = _routed(model, ids)
        with group.recording() as rec:
            recorded_logits = model(ids).logits
        with group.replaying(rec.trace):
            replayed, replay_ids, replay_gates = _routed(model, ids)
    assert torch.equal(recorded_logits, free) and torch.equal(replayed, free)
    assert torch.equal(replay_ids[0], free_ids[0])
    assert torch.equal(replay_gates[0], free_gates[0])
    assert torch.equal(rec.trace.ids[:, 0].long(), free_ids[0])
    # the gates are the HF formula: σ over the chosen experts, renormalised, · 2.5
    assert torch.allclose(free_gates[0].sum(-1), torch.full((ids.numel(),), 2.5))


@FAMILY
def test_replay_after_weight_change_keeps_experts_and_router_learns(family: str) -> None:
    model = SIGMOID[family][0]()
    group = patch_moe_routers(model)  # the family-generic entry point finds the same router
    ids = _ids()
    with torch.no_grad(), group.recording() as rec:
        _, recorded, _ = _routed(model, ids)
    gate = model.model.layers[1].mlp.gate
    with torch.no_grad():  # new router weights and a new selection bias
        gate.weight.add_(torch.randn(gate.weight.shape, generator=torch.Generator().manual_seed(7)))
        gate.e_score_correction_bias.add_(2.0 * torch.arange(8.0))
        _, free, _ = _routed(model, ids)
    assert not torch.equal(free[0], recorded[0])  # free routing now picks other experts
    model.zero_grad()
    with group.replaying(rec.trace):
        logits, replayed, gates = _routed(model, ids)
    assert torch.equal(replayed[0], recorded[0])  # exactly the recorded experts
    # gates: the live sigmoid scores of the replayed experts (no bias), renormalised, · 2.5
    hidden = _router_input(model, ids)
    scores = torch.sigmoid(hidden @ gate.weight.T).gather(1, recorded[0])
    want = scores / (scores.sum(-1, keepdim=True) + 1e-20) * 2.5
    assert torch.allclose(gates[0], want, atol=1e-6)
    logits.logsumexp(-1).sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert gate.e_score_correction_bias.grad is None  # a buffer: never trained


def _router_input(model: Any, ids: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    gate = model.model.layers[1].mlp.gate
    hook = gate.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        hook.remove()
    return got[0].reshape(-1, gate.hidden_dim).float()


@FAMILY
def test_replay_mask_routes_left_out_rows_live(family: str) -> None:
    policy, patch, _ = SIGMOID[family]
    model = policy()
    group = patch(model)
    ids = _ids()
    with torch.no_grad():
        _, free, _ = _routed(model, ids)
        n = ids.numel()
        other = (free[0] + 1) % 8  # ids the router would not choose
        other = torch.where(other[:, :1] == other[:, 1:], (other + 1) % 8, other)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[: n // 2] = True
        with group[0].replaying(other, mask):
            _, got, _ = _routed(model, ids)
    assert torch.equal(got[0][: n // 2], other[: n // 2])
    assert torch.equal(got[0][n // 2:], free[0][n // 2:])

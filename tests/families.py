"""The smallest architectures of the model families beyond the tiny Qwen3-MoE, shared by the
embedded (tests/runtime) and Megatron (tests/megatron) tests."""

from __future__ import annotations

from typing import Any


def tiny_deepseek_arch(*, q_lora_rank: int | None = 32, groups: bool = True) -> dict[str, Any]:
    """A 2-layer DeepSeek-V3-style ``model.architecture``: MLA (q_lora_rank 32, or full-rank
    queries with None), one leading dense layer, 8 sigmoid-routed experts with the selection
    bias, top-2, one shared expert, routed scaling 2.5 and (``groups``) 4 groups of which a
    token may use 1 (top_k = 2 · group_top_k, where HF and Megatron group scores agree)."""
    return {
        "family": "deepseek_v3", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
        "num_attention_heads": 2, "attention": "mla",
        "mla": {"q_lora_rank": q_lora_rank, "kv_lora_rank": 32, "qk_head_dim": 32,
                "qk_pos_emb_head_dim": 32, "v_head_dim": 32},
        "vocab_size": 64, "max_position_embeddings": 256, "rope_theta": 10000.0,
        "tie_embeddings": False, "moe": _sigmoid_moe(groups),
    }


def _sigmoid_moe(groups: bool) -> dict[str, Any]:
    """DeepSeek-V3's MoE, tiny (GLM-4.5 has the same): 8 sigmoid-routed experts with the
    selection bias, top-2, one shared expert, one leading dense layer, routed scaling 2.5 and
    (``groups``) 4 groups of which a token may use 1."""
    moe: dict[str, Any] = {
        "num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 32,
        "score_function": "sigmoid", "expert_bias": True, "norm_topk_prob": True,
        "shared_experts": 1, "first_dense_layers": 1, "routed_scaling_factor": 2.5,
        "aux_loss_coeff": 0.0, "token_dispatcher": "allgather",
    }
    if groups:
        moe.update(num_groups=4, group_top_k=1)
    return moe


def tiny_deepseek_policy(seed: int = 0, *, q_lora_rank: int | None = 32,
                         groups: bool = True, bias_seed: int | None = 3,
                         layers: int | None = None) -> Any:
    """The HF DeepseekV3ForCausalLM of :func:`tiny_deepseek_arch` (random weights, seed;
    ``layers`` decoder layers instead of 2), with router weights scaled up so routing is
    decisive, and (``bias_seed``) a random non-zero selection bias, so tests see the bias
    steer the choice."""

    from runtime.policy import build_policy, build_tokenizer

    arch = tiny_deepseek_arch(q_lora_rank=q_lora_rank, groups=groups)
    if layers is not None:
        arch["num_layers"] = layers
    model = build_policy(arch, build_tokenizer(int(arch["vocab_size"])), seed)
    _randomise(model, seed, bias_seed)
    return model.eval()


def tiny_glm_arch(*, groups: bool = False, qk_norm: bool | None = None) -> dict[str, Any]:
    """A 2-layer GLM-4.5-style ``model.architecture``: GQA (4 heads, 2 query groups, head_dim
    16, RoPE on half of each head: GLM-4.5's default partial_rotary_factor), q/k/v biases,
    (``qk_norm``: GLM-4.5's per-head q/k norms; none: the family's, without, as GLM-4.5-Air),
    one leading dense layer, 8 sigmoid-routed experts with the selection bias, top-2, one
    shared expert, routed scaling 2.5 and (``groups``) 4 groups of which a token may use 1."""
    return {
        "family": "glm4_moe", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
        "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 16, "attention": "gqa",
        "vocab_size": 64, "max_position_embeddings": 256, "rope_theta": 10000.0,
        "tie_embeddings": False, "moe": _sigmoid_moe(groups), "qk_norm": qk_norm,
    }


def tiny_dense_arch(family: str, *, layers: int = 2, tie: bool = False) -> dict[str, Any]:
    """A dense ``model.architecture`` of ``family`` (qwen3 or llama): GQA with 4 heads of 16
    over 2 query groups, 2 layers (``layers``), untied embeddings unless ``tie``."""
    return {
        "family": family, "num_layers": layers, "hidden_size": 64, "ffn_hidden_size": 128,
        "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 16, "attention": "gqa",
        "vocab_size": 64, "max_position_embeddings": 256, "rope_theta": 10000.0,
        "tie_embeddings": tie,
    }


def _randomise(model: Any, seed: int, bias_seed: int | None) -> None:
    """Router weights scaled up (decisive routing), a random selection bias (``bias_seed``)
    and random attention biases (HF initialises biases to zero, which would hide a bias
    mapped to the wrong rows)."""
    import torch

    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.normal_(0.0, 0.5, generator=g)
            if name.endswith(("q_norm.weight", "k_norm.weight")):  # HF initialises them to 1
                p.uniform_(0.5, 1.5, generator=g)
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is None or not hasattr(gate, "e_score_correction_bias"):
                continue
            gate.weight.normal_(0.0, 0.5, generator=g)
            if bias_seed is not None:
                gate.e_score_correction_bias.copy_(
                    torch.randn(gate.e_score_correction_bias.shape,
                                generator=torch.Generator().manual_seed(bias_seed)) * 0.1)


def tiny_glm_policy(seed: int = 0, *, groups: bool = False, qk_norm: bool | None = None,
                    bias_seed: int | None = 3, layers: int | None = None) -> Any:
    """The HF Glm4MoeForCausalLM of :func:`tiny_glm_arch` (random weights, seed; ``layers``
    decoder layers instead of 2), router weights scaled up, a random selection bias
    (``bias_seed``), random q/k/v biases and (``qk_norm``) random q/k norm weights."""
    from runtime.policy import build_policy, build_tokenizer

    arch = tiny_glm_arch(groups=groups, qk_norm=qk_norm)
    if layers is not None:
        arch["num_layers"] = layers
    model = build_policy(arch, build_tokenizer(int(arch["vocab_size"])), seed)
    _randomise(model, seed, bias_seed)
    return model.eval()


def tiny_dense_policy(family: str, seed: int = 0, *, layers: int = 2, tie: bool = False) -> Any:
    """The HF Qwen3ForCausalLM / LlamaForCausalLM of :func:`tiny_dense_arch` (random weights)."""
    from runtime.policy import build_policy, build_tokenizer

    arch = tiny_dense_arch(family, layers=layers, tie=tie)
    return build_policy(arch, build_tokenizer(int(arch["vocab_size"])), seed).eval()

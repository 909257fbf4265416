"""GLM-4.5 / GLM-4.5-Air (HF ``Glm4MoeForCausalLM``) as a megatron-core GPTModel.

GLM-4.5 is grouped-query attention (Qwen3's layout, :mod:`runtime.megatron.model`) in front of
DeepSeek-V3's MoE (:func:`runtime.megatron.deepseek.sigmoid_moe_fields`). Mapping
(``Glm4MoeConfig`` → ``TransformerConfig`` / ``GPTModel``), next to the common GQA fields::

    attention_bias → add_qkv_bias (q/k/v biases; o_proj has none)
    use_qk_norm → qk_layernorm (q_norm / k_norm → q_layernorm / k_layernorm)
    rope_parameters.partial_rotary_factor → GPTModel(rotary_percent=…): RoPE on the first
        int(head_dim · factor) dims of each head, rotate-half layout on both sides
        (HF ``apply_rotary_pos_emb`` splits q[..., :rot] / q[..., rot:]; megatron-core's
        ``_apply_rotary_pos_emb_bshd`` splits at freqs.shape[-1] = the same rot)
    n_routed_experts, num_experts_per_tok, moe_intermediate_size, n_shared_experts,
    first_k_dense_replace, routed_scaling_factor, n_group / topk_group, the sigmoid router
    with ``e_score_correction_bias`` → DeepSeek-V3's fields (``sigmoid_moe_fields``)

Routing equals HF's (``Glm4MoeTopkRouter`` is DeepSeek-V3's router): σ = sigmoid(logits);
sel = top-k of σ + b over the allowed groups; gates σ_sel / (Σ σ_sel + 1e-20) · scaling.
Weights: the GQA attention of :func:`runtime.megatron.hf_weights.hf_to_megatron` (bias rows in
the same per-group [q | k | v] order as the weights) and the MLPs of
:mod:`runtime.megatron.hf_mlp` (router bias, shared experts, leading dense layers).
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from runtime.megatron.deepseek import sigmoid_moe_fields

__all__ = ["family_fields", "is_glm"]


def is_glm(cfg: Any) -> bool:
    return getattr(cfg, "model_type", None) == "glm4_moe"


def family_fields(cfg: Any) -> tuple[type, dict[str, Any]]:
    """(config class, fields) that replace the Qwen3-MoE fields of ``transformer_config`` for
    a GLM-4.5 HF config (mapping in the module doc; ``rotary_percent`` is a GPTModel
    argument, :func:`runtime.megatron.args.hf_rotary_percent`)."""
    return TransformerConfig, dict(
        qk_layernorm=bool(cfg.use_qk_norm),
        add_qkv_bias=bool(cfg.attention_bias),
        **sigmoid_moe_fields(cfg),
    )

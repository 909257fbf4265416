"""DeepSeek-V3 / Moonlight (HF ``DeepseekV3ForCausalLM``) as a megatron-core GPTModel.

Architecture mapping (``DeepseekV3Config`` → ``MLATransformerConfig``), next to the common
fields of :func:`runtime.megatron.model.transformer_config`::

    q_lora_rank → q_lora_rank (None: linear_q_proj)   kv_lora_rank → kv_lora_rank
    qk_nope_head_dim → qk_head_dim                    qk_rope_head_dim → qk_pos_emb_head_dim
    v_head_dim → v_head_dim (and kv_channels)         rope_parameters.rope_theta → rotary_base
    rope_type "rope" (default RoPE; rope_interleave True ↔ MLA's de-interleaving RoPE)
    q_a_layernorm / kv_a_layernorm → qk_layernorm (q_layernorm / kv_layernorm)
    n_routed_experts → num_moe_experts                 first_k_dense_replace = k → moe_layer_freq [0]*k + [1]*(L−k)
    sigmoid router, e_score_correction_bias → moe_router_score_function "sigmoid",
        moe_router_enable_expert_bias (the buffer ``router.expert_bias``)
    n_shared_experts · moe_intermediate_size → moe_shared_expert_intermediate_size
    routed_scaling_factor → moe_router_topk_scaling_factor (None when 1)
    n_group / topk_group → moe_router_num_groups / moe_router_group_topk (only when
        topk_group < n_group: with every group allowed, neither side masks anything)

Routing equals HF's: σ = sigmoid(logits); sel = top-k of σ + b over the allowed groups; gates
σ_sel / (Σ σ_sel + 1e-20) · scaling. Two limits of megatron-core 0.16.1, refused by
:func:`family_fields`: it renormalises a sigmoid top-k (k > 1) always (HF's
``norm_topk_prob: false`` has no counterpart), and it scores a group by its top-(k / topk_group)
experts where HF and vLLM take the top 2, so the groups agree only when k = 2 · topk_group
(DeepSeek-V3: 8 = 2 · 4; Moonlight has one group).

The selection bias takes no gradient. megatron-core updates it after every optimizer step
(``finalize_model_grads``: b += rate · sign(mean − tokens per expert), DeepSeek-V3's rule) at
``moe_router_bias_update_rate``, which :func:`family_fields` sets to 0 (conversion, log-probs)
unless the caller passes DeepSeek's 1e-3 (the RL job does for ``moe.expert_bias: true``).

Weights (:func:`layer_to_megatron`, one decoder layer of the full TP=1/EP=1 layout)::

    q_proj | q_a_proj, q_a_layernorm, q_b_proj → linear_q_proj | linear_q_down_proj,
                                                  q_layernorm, linear_q_up_proj
    kv_a_proj_with_mqa → linear_kv_down_proj   kv_a_layernorm → kv_layernorm
    kv_b_proj → linear_kv_up_proj               o_proj → linear_proj
    mlp.gate.weight → mlp.router.weight         mlp.gate.e_score_correction_bias → mlp.router.expert_bias
    mlp.shared_experts.{gate,up,down}_proj → mlp.shared_experts.linear_fc1 ([gate; up]), linear_fc2
    (the MLP names are every family's: :mod:`runtime.megatron.hf_mlp`)

(rows keep their order: HF and megatron-core view every projection as [heads, nope | rope]
and [heads, nope | v], and split the KV down-projection as [kv_lora_rank | rope]).

Local (non-TransformerEngine) MLA needs two adaptations of megatron-core 0.16.1, on CPU and
GPU alike (:func:`mla_layer_spec`): the local ``DotProductAttention`` does not take MLA's
``k_channels`` / ``v_channels`` (a TypeError when the layer is built), so MLA layers get
:class:`MLADotProductAttention`, the same computation with the value head width as its
output; and without TransformerEngine ``multi_latent_attention`` still believes TE imported
(its TE names are MagicMock stand-ins, and ``isinstance(…, TELinear)`` raises), so its
``HAVE_TE`` is set to what ``megatron.core.extensions.transformer_engine`` found. The local
spec also makes the two down-projections (``linear_q_down_proj``, ``linear_kv_down_proj``)
column-parallel: under TP > 1 their output is gathered over the TP group, whose backward
keeps each rank's own slice, but the RoPE key part of the KV down-projection feeds every
rank's attention heads, so its gradient is a sum over the TP ranks that the slice drops
(the step then differs from the HF one: tests/megatron, DeepSeek at TP 2). MLA layers get
:class:`DuplicatedLinear` there instead, megatron-core's ``parallel_mode="duplicated"`` (TE's
``TELinear``): the whole weight on every rank, applied to its sequence shard; the RoPE keys
are gathered over the sequence (backward: reduce-scatter, the sum) and the weight's gradient
is summed over the TP group by ``finalize_model_grads`` (``sequence_parallel`` attribute).
:func:`runtime.megatron.model.build_gpt_model` then replaces that core attention with torch
SDPA (:mod:`runtime.megatron.attention`, which takes ``k_channels`` / ``v_channels`` too);
:class:`MLADotProductAttention` remains the local reference it is tested against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from runtime.megatron.args import hf_rope_theta
from runtime.megatron.hf_mlp import mlp_to_hf, mlp_to_megatron

__all__ = ["DuplicatedLinear", "MLADotProductAttention", "family_fields", "is_deepseek",
           "layer_to_hf", "layer_to_megatron", "mla_layer_spec", "sigmoid_moe_fields"]

# DeepSeek-V3's bias update rate γ (and megatron-core's default).
BIAS_UPDATE_RATE = 1e-3


def is_deepseek(cfg: Any) -> bool:
    return getattr(cfg, "model_type", None) == "deepseek_v3"


def family_fields(cfg: Any) -> tuple[type, dict[str, Any]]:
    """(config class, fields) that replace the Qwen3-MoE fields of ``transformer_config`` for
    a DeepSeek-V3 HF config (mapping in the module doc)."""
    if getattr(cfg, "rope_parameters", {}).get("rope_type", "default") != "default":
        raise NotImplementedError("only default RoPE is converted (no YaRN / scaling yet)")
    if not getattr(cfg, "rope_interleave", True):
        raise NotImplementedError("megatron-core's MLA applies the interleaved (DeepSeek) RoPE "
                                  "layout only; rope_interleave: false is not converted")
    return MLATransformerConfig, dict(
        multi_latent_attention=True,
        q_lora_rank=None if cfg.q_lora_rank is None else int(cfg.q_lora_rank),
        kv_lora_rank=int(cfg.kv_lora_rank),
        qk_head_dim=int(cfg.qk_nope_head_dim),
        qk_pos_emb_head_dim=int(cfg.qk_rope_head_dim),
        v_head_dim=int(cfg.v_head_dim),
        kv_channels=int(cfg.v_head_dim),
        num_query_groups=int(cfg.num_attention_heads),
        rope_type="rope",
        rotary_base=hf_rope_theta(cfg),
        rotary_scaling_factor=1.0,
        mscale=1.0,
        mscale_all_dim=0.0,
        qk_layernorm=True,  # q_a_layernorm / kv_a_layernorm
        add_qkv_bias=False,
        **sigmoid_moe_fields(cfg),
    )


def sigmoid_moe_fields(cfg: Any) -> dict[str, Any]:
    """The MoE fields of DeepSeek-V3's sigmoid router, selection bias, group limit, shared
    experts and leading dense layers (module doc), which GLM-4.5 shares under the same HF
    names (``runtime.megatron.glm``); refuses what megatron-core 0.16.1 cannot match."""
    k = int(cfg.num_experts_per_tok)
    if k > 1 and not cfg.norm_topk_prob:
        raise NotImplementedError(
            "megatron-core 0.16.1 always renormalises a sigmoid router's top-k gates "
            "(norm_topk_prob: false has no Megatron counterpart)")
    groups, chosen = int(cfg.n_group or 1), int(cfg.topk_group or 1)
    limited = chosen < groups
    if limited and k != 2 * chosen:
        raise NotImplementedError(
            f"group-limited routing with top_k {k} ≠ 2 · topk_group {chosen}: megatron-core "
            "scores a group by its top-(k / topk_group) experts, HF by its top 2")
    layers = int(cfg.num_hidden_layers)
    dense = int(cfg.first_k_dense_replace or 0)
    shared = int(cfg.n_shared_experts or 0) * int(cfg.moe_intermediate_size)
    scaling = float(cfg.routed_scaling_factor)
    return dict(
        num_moe_experts=int(cfg.n_routed_experts),
        moe_router_score_function="sigmoid",
        moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=True,  # HF always has the (possibly zero) bias
        moe_router_bias_update_rate=0.0,
        moe_shared_expert_intermediate_size=shared or None,
        moe_layer_freq=[0] * dense + [1] * (layers - dense),
        moe_router_topk_scaling_factor=None if scaling == 1.0 else scaling,
        moe_router_num_groups=groups if limited else None,
        moe_router_group_topk=chosen if limited else None,
    )


class MLADotProductAttention(DotProductAttention):
    """megatron-core's local ``DotProductAttention`` for MLA: queries and keys of
    ``k_channels`` (nope + rope), values of ``v_channels``; the softmax scale is MLA's.
    The parent's computation does not depend on the head widths except for the width of
    its output, [s, b, heads/tp · v_channels]."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, k_channels: int | None = None,
                 v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection: Any = None) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        v = v_channels or getattr(config, "v_head_dim", None) or config.kv_channels
        tp = self.pg_collection.tp.size()
        self.hidden_size_per_partition = divide(int(v) * config.num_attention_heads, tp)


class DuplicatedLinear(torch.nn.Linear):
    """A linear layer whose whole weight every tensor-parallel rank holds and applies to its
    own tokens (module doc): megatron-core's ``parallel_mode="duplicated"`` without
    TransformerEngine. Its gradient is summed over the TP group under sequence parallelism
    (``finalize_model_grads``) and averaged over data parallelism like any dense weight."""

    def __init__(self, input_size: int, output_size: int, *, config: Any, bias: bool = True,
                 skip_bias_add: bool = False, **_: Any) -> None:
        super().__init__(input_size, output_size, bias=bias, dtype=config.params_dtype)
        self._return_bias = skip_bias_add and bias
        for param in self.parameters():
            param.allreduce = True  # type: ignore[attr-defined]
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, x: Tensor) -> Any:
        return super().forward(x) if self._return_bias else (super().forward(x), None)


def _swap(spec: Any, old: type, new: type, fields: tuple[str, ...] | None = None) -> Any:
    """``spec`` with ``old`` replaced by ``new`` (only in the dataclass fields named
    ``fields``, when given)."""
    if spec is old and fields is None:
        return new
    if isinstance(spec, list | tuple):
        return type(spec)(_swap(s, old, new, fields) for s in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        def field(name: str) -> Any:
            value = getattr(spec, name)
            if fields is not None and name in fields and value is old:
                return new
            return _swap(value, old, new, fields)

        return dataclasses.replace(spec, **{f.name: field(f.name)
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


def mla_layer_spec(spec: Any) -> Any:
    """The local block spec with MLA's core attention (module doc); also corrects
    ``multi_latent_attention.HAVE_TE`` where TransformerEngine is absent."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer import multi_latent_attention as mla

    if not getattr(te_ext, "HAVE_TE", False):
        mla.HAVE_TE = False
    # MLA accepts its module-level ``Linear`` as a duplicated down-projection: TE's, else ours
    if mla.Linear is None:
        mla.Linear = DuplicatedLinear
    spec = _swap(spec, ColumnParallelLinear, mla.Linear,
                 fields=("linear_q_down_proj", "linear_kv_down_proj"))
    return _swap(spec, DotProductAttention, MLADotProductAttention)


# --------------------------------------------------------------------------- weights

_ATTN = (("q_proj.weight", "linear_q_proj.weight"),
         ("q_a_proj.weight", "linear_q_down_proj.weight"),
         ("q_a_layernorm.weight", "q_layernorm.weight"),
         ("q_b_proj.weight", "linear_q_up_proj.weight"),
         ("kv_a_proj_with_mqa.weight", "linear_kv_down_proj.weight"),
         ("kv_a_layernorm.weight", "kv_layernorm.weight"),
         ("kv_b_proj.weight", "linear_kv_up_proj.weight"),
         ("o_proj.weight", "linear_proj.weight"))


def layer_to_megatron(sd: Mapping[str, Tensor], cfg: Any, i: int,
                      experts: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Decoder layer ``i`` of HF DeepSeek-V3 weights (fused in-memory experts of transformers
    5, or per-expert checkpoint tensors) → its GPTModel tensors, ``router.expert_bias``
    included (``experts``: only those routed experts, all by default)."""
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    out: dict[str, Tensor] = {}
    for ours, theirs in _ATTN:
        if h + "self_attn." + ours in sd:
            out[m + "self_attention." + theirs] = sd[h + "self_attn." + ours]
    out[m + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
    out[m + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
    out.update(mlp_to_megatron(sd, h, m, int(cfg.n_routed_experts), experts))
    return out


def layer_to_hf(full: Mapping[str, Tensor], cfg: Any, i: int) -> dict[str, Tensor]:
    """Inverse of :func:`layer_to_megatron`, experts in transformers 5's fused layout."""
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    out: dict[str, Tensor] = {}
    for ours, theirs in _ATTN:
        if m + "self_attention." + theirs in full:
            out[h + "self_attn." + ours] = full[m + "self_attention." + theirs]
    out[h + "input_layernorm.weight"] = full[m + "input_layernorm.weight"]
    out[h + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"]
    out.update(mlp_to_hf(full, h, m, int(cfg.n_routed_experts), shared_module=True))
    return out

"""A megatron-core GPTModel that computes exactly what the HF model of the spec's family computes.

Families: Qwen3-MoE (this module), Qwen3 and Llama (dense: this module, no MoE fields),
DeepSeek-V3 (:mod:`runtime.megatron.deepseek`: MLA, sigmoid router), GLM-4.5
(:mod:`runtime.megatron.glm`: this module's GQA with q/k/v biases and partial RoPE, DeepSeek-V3's
MoE). Architecture mapping (``Qwen3MoeConfig`` / ``Qwen3Config`` / ``LlamaConfig`` →
``TransformerConfig`` / ``GPTModel``)::

    num_hidden_layers → num_layers            hidden_size → hidden_size
    num_attention_heads → num_attention_heads num_key_value_heads → num_query_groups
    head_dim → kv_channels                    rms_norm_eps → layernorm_epsilon
    intermediate_size → ffn_hidden_size       moe_intermediate_size → moe_ffn_hidden_size
    num_experts → num_moe_experts             num_experts_per_tok → moe_router_topk
    mlp_only_layers → moe_layer_freq (0 = dense, 1 = MoE)
    rope_parameters.rope_theta → rotary_base  tie_word_embeddings → share_embeddings_and_output_weights
    rope_parameters.partial_rotary_factor → rotary_percent (GPTModel; 1 where absent)
    attention_bias → add_qkv_bias             q_norm / k_norm (Qwen3; GLM use_qk_norm) → qk_layernorm
    (RMSNorm, SwiGLU, no linear bias; a dense model: num_moe_experts None, no MoE field)

Routing: Qwen3 takes p = softmax(router logits), keeps the top-k, and with ``norm_topk_prob``
renormalises them: w_i = p_i / Σ_topk p_j = softmax over the top-k *logits*. That is Megatron's
default (``moe_router_pre_softmax=False``: top-k on logits, then softmax). Without
``norm_topk_prob`` the weights are the raw probabilities: ``moe_router_pre_softmax=True``.

Training under tensor parallelism needs sequence parallelism (megatron-core's MoE layer): the
local spec's norms become :class:`SequenceParallelRMSNorm`. Weights loaded from HF get the
tensor-parallel attributes megatron's own initialisation would set
(:func:`_mark_tensor_parallel`, the split dims of :func:`tp_dim`), which the optimizer's
gradient norm relies on.

Core attention is torch SDPA (:mod:`runtime.megatron.attention`, put into the local spec by
:func:`build_gpt_model`) instead of the local ``DotProductAttention``, which materialises the
score matrix; ``runtime.megatron.logprobs.megatron_logprobs`` passes no mask for right-padded
batches (causal attention: flash kernels on GPUs).

Elsewhere: the process groups in :mod:`runtime.megatron.parallel`, the weights (HF ↔ Megatron,
load and gather) in :mod:`runtime.megatron.hf_weights`, the per-token log-probs in
:mod:`runtime.megatron.logprobs`. CPU runs need :func:`runtime.megatron.cpu.enable_cpu` first
(see that module).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import PretrainedConfig

from runtime.megatron import attention, deepseek, glm
from runtime.megatron.args import (
    hf_moe_layers,
    hf_num_experts,
    hf_qk_norm,
    hf_rope_theta,
    hf_rotary_percent,
)

__all__ = [
    "SequenceParallelRMSNorm",
    "build_gpt_chunks",
    "build_gpt_model",
    "expert_tp_dim",
    "global_name",
    "layer_offset",
    "model_chunks",
    "tp_dim",
    "transformer_config",
]


# --------------------------------------------------------------------------- model


def transformer_config(cfg: PretrainedConfig, *, tp: int = 1, ep: int = 1, pp: int = 1,
                       etp: int = 1, dtype: torch.dtype = torch.float32, routing_replay: bool = False,
                       **overrides: Any) -> TransformerConfig:
    """The ``TransformerConfig`` of a Qwen3-MoE HF config (mapping in the module doc);
    ``overrides`` replace fields that do not change the model's function (the token
    dispatcher, activation recomputation)."""
    if getattr(cfg, "rope_parameters", {}).get("rope_type", "default") != "default":
        raise NotImplementedError("only default RoPE is converted (no YaRN / scaling yet)")
    if getattr(cfg, "model_type", None) == "llama" and (cfg.attention_bias or cfg.mlp_bias):
        raise NotImplementedError("Llama with attention_bias / mlp_bias (biases on o_proj and the "
                                  "MLP too) has no megatron-core local-spec counterpart here")
    fields: dict[str, Any] = dict(
        num_layers=int(cfg.num_hidden_layers),
        hidden_size=int(cfg.hidden_size),
        num_attention_heads=int(cfg.num_attention_heads),
        num_query_groups=int(cfg.num_key_value_heads),
        kv_channels=int(cfg.head_dim),
        ffn_hidden_size=int(cfg.intermediate_size),
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.rms_norm_eps),
        qk_layernorm=hf_qk_norm(cfg),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(getattr(cfg, "attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # parallelism / precision
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,  # the activations stages send each other
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        # Sequence parallelism (needed to train MoE under TP) swaps the local spec's norms for
        # SequenceParallelRMSNorm; off by default (the forward alone does not need it).
        sequence_parallel=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=False,  # weights come from hf_to_megatron
        # pure-PyTorch paths (no fused kernels)
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    if hf_num_experts(cfg):  # the MoE families (a dense model leaves num_moe_experts None)
        fields.update(
            num_moe_experts=hf_num_experts(cfg),
            moe_ffn_hidden_size=int(cfg.moe_intermediate_size),
            moe_router_topk=int(cfg.num_experts_per_tok),
            moe_router_pre_softmax=not bool(cfg.norm_topk_prob),
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
            moe_layer_freq=hf_moe_layers(cfg),
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            moe_enable_routing_replay=routing_replay,
        )
    elif routing_replay:
        raise ValueError(f"{getattr(cfg, 'model_type', 'this')} model is dense: it has no "
                         "routers to replay")
    else:  # MoE-only settings the RL job passes whatever the family
        overrides = {k: v for k, v in overrides.items() if not k.startswith("moe_")}
    config_class: type = TransformerConfig
    if deepseek.is_deepseek(cfg):  # MLA, sigmoid router (runtime.megatron.deepseek)
        config_class, family = deepseek.family_fields(cfg)
        fields.update(family)
    elif glm.is_glm(cfg):  # qkv bias, sigmoid router (runtime.megatron.glm)
        config_class, family = glm.family_fields(cfg)
        fields.update(family)
    return config_class(**{**fields, **overrides})


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for megatron-core's local layer spec, usable under sequence parallelism
    (megatron's ``WrappedTorchNorm`` refuses it; TransformerEngine's norm is the GPU
    alternative). RMSNorm is per token, so each tensor-parallel rank normalises its own
    sequence shard unchanged; the weight is marked ``sequence_parallel``, so that
    ``finalize_model_grads`` sums its gradient, computed from that shard only, over the
    tensor-parallel group."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]


def _with_norm(spec: Any, norm: type) -> Any:
    """``spec`` (a ModuleSpec tree of dataclasses) with every norm of the local spec → ``norm``.

    Those are ``WrappedTorchNorm`` and, where apex imports (NGC images ship it), the block's
    final norm is apex's ``FusedLayerNorm`` (gpt_layer_specs' ``LNImpl``), which refuses
    RMSNorm when built."""
    import dataclasses

    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    if spec is WrappedTorchNorm or spec is FusedLayerNorm:
        return norm
    if isinstance(spec, list | tuple):
        return type(spec)(_with_norm(s, norm) for s in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _with_norm(getattr(spec, f.name), norm)
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


def build_gpt_model(cfg: PretrainedConfig, pg_collection: ProcessGroupCollection, *,
                    tp: int = 1, ep: int = 1, pp: int = 1, etp: int = 1,
                    routing_replay: bool = False, dtype: torch.dtype = torch.float32,
                    vp_stage: int | None = None, **overrides: Any) -> GPTModel:
    """The local (non-TransformerEngine) GPTModel of a Qwen3-MoE config, this rank's shard
    (``overrides``: :func:`transformer_config`'s, e.g. the uneven pipeline stages
    ``num_layers_in_first/last_pipeline_stage``); ``vp_stage``: the virtual pipeline stage
    (model chunk) of this rank to build (:func:`build_gpt_chunks`)."""
    experts = hf_num_experts(cfg)
    if int(cfg.num_key_value_heads) % tp or (experts or 1) % ep:
        raise ValueError(f"tp={tp} must divide the {cfg.num_key_value_heads} query groups and "
                         f"ep={ep} the {experts} experts")
    if experts and int(cfg.moe_intermediate_size) % etp:
        raise ValueError(f"etp={etp} must divide the experts' {cfg.moe_intermediate_size} "
                         "intermediate channels")
    tcfg = transformer_config(cfg, tp=tp, ep=ep, pp=pp, etp=etp, dtype=dtype,
                              routing_replay=routing_replay, **overrides)
    spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=False, normalization="RMSNorm",
                                      pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                                      vp_stage=vp_stage)
    spec = _with_norm(spec, SequenceParallelRMSNorm if tcfg.sequence_parallel else WrappedTorchNorm)
    if tcfg.multi_latent_attention:
        spec = deepseek.mla_layer_spec(spec)
    spec = attention.sdpa_layer_spec(spec)  # core attention: torch SDPA (runtime.megatron.attention)
    model = GPTModel(
        config=tcfg, transformer_layer_spec=spec, vocab_size=int(cfg.vocab_size),
        max_sequence_length=int(cfg.max_position_embeddings),
        share_embeddings_and_output_weights=bool(cfg.tie_word_embeddings),
        position_embedding_type="rope", rotary_base=hf_rope_theta(cfg),  # type: ignore[arg-type]
        rotary_percent=hf_rotary_percent(cfg),
        parallel_output=True, pg_collection=pg_collection, vp_stage=vp_stage,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))
    _mark_tensor_parallel(model)
    _count_real_tokens(model)
    if dtype != torch.float32:
        # The local spec builds its torch norms in fp32 whatever params_dtype says: every
        # parameter of a bf16 model is bf16, as Megatron-LM's Float16Module makes it and vLLM
        # serves it. Buffers keep their dtype: the routers' expert bias and token counters
        # are fp32 bookkeeping (counts of thousands of tokens step by 32 in bf16).
        for param in model.parameters():
            param.data = param.data.to(dtype)
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        # built on the CPU (use_cpu_initialization), trained on this rank's GPU
        model.cuda(torch.cuda.current_device())
    return model


def build_gpt_chunks(cfg: PretrainedConfig, pg_collection: ProcessGroupCollection, *,
                     vpp: int | None = None, **kwargs: Any) -> list[GPTModel]:
    """This rank's model chunks: one GPTModel per virtual pipeline stage (``vpp``, interleaved
    1F1B; parallel state initialised with the same ``vpp``), or the one model without.
    ``kwargs``: :func:`build_gpt_model`'s."""
    if not vpp:
        return [build_gpt_model(cfg, pg_collection, **kwargs)]
    return [build_gpt_model(cfg, pg_collection, vp_stage=i,
                            virtual_pipeline_model_parallel_size=vpp, **kwargs)
            for i in range(vpp)]


def _count_real_tokens(model: GPTModel) -> None:
    """The expert-bias update counts the tokens each expert received without the padding
    (``runtime.megatron.logprobs`` passes megatron's MoE ``padding_mask``), which megatron-core
    0.16.1's ``TopKRouter._apply_expert_bias`` cannot apply: it masks the routing map
    [tokens, experts] with the flat mask [tokens] (a shape error). Each router with an expert
    bias gets the mask as a column. Without it the padding, routed to the replay's filler
    experts 0..k−1, would lower their bias every step."""
    from megatron.core.transformer.moe.router import TopKRouter

    for module in model.modules():
        if isinstance(module, TopKRouter) and module.enable_expert_bias:
            count = module._apply_expert_bias

            def by_column(routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None,
                          count: Any = count) -> None:
                count(routing_map, None if padding_mask is None else padding_mask.reshape(-1, 1))

            module._apply_expert_bias = by_column  # type: ignore[method-assign]


def _mark_tensor_parallel(model: GPTModel) -> None:
    """Set the tensor-parallel attributes megatron-core's own weight initialisation would set
    (skipped here: ``perform_initialization=False``, the weights come from HF). The optimizer
    counts a parameter without ``tensor_model_parallel`` in the gradient norm on TP rank 0
    only, as a replica; sharded weights and the experts (each on one expert-parallel rank)
    must count on every rank, or clipping sees too small a norm under TP.

    Experts are also marked ``allreduce = False`` at every expert-parallel size: megatron-core
    0.16.1's linear layers do so only when EP > 1, so at EP = 1 its DDP and optimizer would
    treat them as dense weights, reduced and sharded over the dense data-parallel group. With
    ETP ≠ TP that group mixes different expert shards (ETP 2, TP 1: both ETP ranks' halves
    averaged), and with ETP 1 < TP it misses the TP ranks' sequence shards; the expert
    data-parallel group is the right one in every case."""
    for name, param in model.named_parameters():
        dim = tp_dim(name)
        if ".local_experts." in name:
            dim = 0 if name.endswith("linear_fc1.weight") else 1
            param.allreduce = False  # type: ignore[attr-defined]
        if dim is not None and not getattr(param, "tensor_model_parallel", False):
            tensor_parallel.set_tensor_model_parallel_attributes(param, True, dim, 1)


# --------------------------------------------------------------------------- layout

# Tensor-parallel split of the GPTModel parameters the local spec shards (experts: over the
# expert-tensor-parallel group, :func:`expert_tp_dim`); every other parameter is replicated.
_TP_DIM0 = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight",
            "output_layer.weight", "linear_q_proj.weight", "linear_q_up_proj.weight",
            "linear_kv_up_proj.weight")  # MLA's down-projections: duplicated (deepseek)
_TP_DIM1 = ("linear_proj.weight",)


def tp_dim(name: str) -> int | None:
    """The dim a dense parameter is split along over the tensor-parallel group (None:
    replicated, or an expert: :func:`expert_tp_dim`)."""
    if ".local_experts." in name:
        return None
    if name.endswith(_TP_DIM0) or name.endswith(("mlp.linear_fc1.weight",
                                                  "shared_experts.linear_fc1.weight")):
        return 0
    if name.endswith(_TP_DIM1) or name.endswith(("mlp.linear_fc2.weight",
                                                  "shared_experts.linear_fc2.weight")):
        return 1
    return None


def expert_tp_dim(name: str) -> int:
    """The dim an expert's parameter is split along over the expert-tensor-parallel group."""
    return 0 if name.endswith(("linear_fc1.weight", "linear_fc1.bias")) else 1


def model_chunks(model: GPTModel | list[GPTModel]) -> list[GPTModel]:
    """This rank's model chunks (:func:`build_gpt_chunks`) of a GPTModel or a list of them."""
    return list(model) if isinstance(model, list | tuple) else [model]


def layer_offset(model: GPTModel) -> int:
    """Global index of this pipeline stage's (model chunk's) first layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return 0
    return int(get_transformer_layer_offset(model.config, vp_stage=getattr(model, "vp_stage", None)))


def global_name(name: str, offset: int) -> str:
    """``decoder.layers.<i>.…`` of a stage's model → the full model's ``<i + offset>``."""
    if offset and name.startswith("decoder.layers."):
        i, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{int(i) + offset}.{rest}"
    return name

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

Weight layout (:func:`hf_to_megatron`): ``linear_qkv.weight`` stacks, per query group g,
[q heads of g (heads/groups · d rows), k_g (d rows), v_g (d rows)] — megatron-core's
``SelfAttention.get_query_key_value_tensors`` views the output as
[.., groups, (heads/groups + 2)·d]. Gated ``linear_fc1.weight`` is [gate; up] (the GLU
chunks the output in two). The full state dict is the TP=1/EP=1 layout;
:func:`load_hf_weights` slices it for the local rank along the one dim whose size differs
(column-parallel / vocab: dim 0, row-parallel: dim 1; qkv chunks are whole query groups; the
gated fc1 takes [gate_r; up_r]), picks experts by expert-parallel rank and slices them
likewise over the expert-tensor-parallel group (``etp``; Megatron-LM's default is ETP = TP).

Per-token log-probs follow ``runtime.trainer.sequence_logprobs``: logp[b, t] = log π(x_t | x_<t),
position 0 is 0; computed from the vocab-parallel logits with
``tensor_parallel.vocab_parallel_cross_entropy`` (logp = −CE), entropy
H = log Z − Σ_v p_v z_v with max / sums all-reduced over the tensor-parallel group.

Training under tensor parallelism needs sequence parallelism (megatron-core's MoE layer): the
local spec's norms become :class:`SequenceParallelRMSNorm`. Weights loaded from HF get the
tensor-parallel attributes megatron's own initialisation would set
(:func:`_mark_tensor_parallel`), which the optimizer's gradient norm relies on.

Core attention is torch SDPA (:mod:`runtime.megatron.attention`, put into the local spec by
:func:`build_gpt_model`) instead of the local ``DotProductAttention``, which materialises the
score matrix; :func:`megatron_logprobs` passes no mask for right-padded batches (causal
attention: flash kernels on GPUs).

CPU runs need :func:`runtime.megatron.cpu.enable_cpu` first (see that module).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from transformers import PretrainedConfig

from runtime.megatron import attention, context_parallel, deepseek, glm
from runtime.megatron.args import (
    hf_moe_layers,
    hf_num_experts,
    hf_qk_norm,
    hf_rope_theta,
    hf_rotary_percent,
)
from runtime.megatron.hf_mlp import mlp_to_hf, mlp_to_megatron

__all__ = [
    "build_gpt_chunks",
    "build_gpt_model",
    "destroy_parallel",
    "gather_full_state_dict",
    "hf_to_megatron",
    "init_parallel",
    "load_hf_weights",
    "megatron_logprobs",
    "megatron_to_hf",
    "transformer_config",
    "use_devices",
]


# --------------------------------------------------------------------------- parallel state


def init_parallel(rank: int, world_size: int, rendezvous: str | os.PathLike[str], *,
                  tp: int = 1, ep: int = 1, pp: int = 1, etp: int = 1,
                  vpp: int | None = None, cp: int = 1, backend: str = "gloo",
                  seed: int = 1234) -> ProcessGroupCollection:
    """Join the default group, build megatron's tensor/expert-parallel groups, seed
    megatron's named RNG states (``model_parallel_cuda_manual_seed``) and return the groups as
    a ``ProcessGroupCollection``. ``rendezvous`` is an init method (``env://`` under torchrun)
    or a file path (``file://`` rendezvous: nothing listens, as tests on this machine need)."""
    init_method = os.fspath(rendezvous)
    if "://" not in init_method:
        init_method = f"file://{init_method}"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, init_method=init_method,
                                             rank=rank, world_size=world_size)
    # etp: expert-tensor parallelism (1: experts whole on their EP rank; Megatron-LM's
    # default when --expert-tensor-parallel-size is unset is ETP = TP, which callers pass)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp,
                                             expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=etp,
                                             context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def use_devices(devices: str) -> tuple[str, torch.dtype | None]:
    """Prepare this process for megatron-core on a spec's ``cluster.devices``; returns the
    process-group backend and the parameter dtype the device forces (None: the spec's).
    ``gpu``: this rank's GPU (``LOCAL_RANK``), NCCL. ``cpu``: the patches of
    :mod:`runtime.megatron.cpu` (tests and CPU smoke runs only; GPU runs never import it),
    gloo, and float32 as the embedded engines use on the CPU."""
    if devices == "cpu":
        from runtime.megatron.cpu import enable_cpu

        enable_cpu()
        return "gloo", torch.float32
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from megatron.core.transformer.moe import moe_utils

    # 0.16.1 binds te_general_gemm only when TransformerEngine imports, but every router reads
    # it: without TE the first router forward is a NameError (measured on an H200).
    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return "nccl", None


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
    """``spec`` (a ModuleSpec tree of dataclasses) with every ``WrappedTorchNorm`` → ``norm``."""
    import dataclasses

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
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
    if tcfg.sequence_parallel:
        spec = _with_norm(spec, SequenceParallelRMSNorm)
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


def _chunks(model: GPTModel | list[GPTModel]) -> list[GPTModel]:
    return list(model) if isinstance(model, list | tuple) else [model]


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
        dim = _tp_dim(name)
        if ".local_experts." in name:
            dim = 0 if name.endswith("linear_fc1.weight") else 1
            param.allreduce = False  # type: ignore[attr-defined]
        if dim is not None and not getattr(param, "tensor_model_parallel", False):
            tensor_parallel.set_tensor_model_parallel_attributes(param, True, dim, 1)


# --------------------------------------------------------------------------- weights


def hf_to_megatron(state_dict_hf: Mapping[str, Tensor], cfg: PretrainedConfig) -> dict[str, Tensor]:
    """HF Qwen3-MoE weights → the full (TP=1, EP=1) GPTModel state dict (layout in the module
    doc). Accepts both the fused in-memory expert layout of transformers 5
    (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) and the per-expert
    checkpoint layout (``experts.{e}.{gate,up,down}_proj.weight``). DeepSeek-V3:
    :func:`runtime.megatron.deepseek.hf_to_megatron`."""
    if deepseek.is_deepseek(cfg):
        return deepseek.hf_to_megatron(state_dict_hf, cfg)
    sd = state_dict_hf
    heads, groups, d = int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.head_dim)
    hidden = int(cfg.hidden_size)
    out: dict[str, Tensor] = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
                              "decoder.final_layernorm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = sd["lm_head.weight"]
    for i in range(int(cfg.num_hidden_layers)):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = sd[h + "self_attn.q_proj.weight"].view(groups, heads // groups * d, hidden)
        k = sd[h + "self_attn.k_proj.weight"].view(groups, d, hidden)
        v = sd[h + "self_attn.v_proj.weight"].view(groups, d, hidden)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, hidden)
        if h + "self_attn.q_proj.bias" in sd:  # attention_bias (GLM-4.5)
            qb = sd[h + "self_attn.q_proj.bias"].view(groups, -1)
            kb = sd[h + "self_attn.k_proj.bias"].view(groups, d)
            vb = sd[h + "self_attn.v_proj.bias"].view(groups, d)
            out[m + "self_attention.linear_qkv.bias"] = torch.cat([qb, kb, vb], 1).reshape(-1)
        if h + "self_attn.q_norm.weight" in sd:  # Qwen3's q/k norms (GLM-4.5: use_qk_norm)
            out[m + "self_attention.q_layernorm.weight"] = sd[h + "self_attn.q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = sd[h + "self_attn.k_norm.weight"]
        out[m + "self_attention.linear_proj.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[m + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        out.update(mlp_to_megatron(sd, h, m, hf_num_experts(cfg)))
    return {k: t.detach().clone().contiguous() for k, t in out.items()}


def _shard(name: str, full: Tensor, param: Tensor, tp_rank: int) -> Tensor:
    """This rank's slice of ``full``: the one dim whose size differs from the local parameter
    (``partition_dim`` is only set when megatron initialises the weights itself)."""
    dims = [i for i, (a, b) in enumerate(zip(full.shape, param.shape, strict=True)) if a != b]
    if not dims:
        return full
    if len(dims) > 1 or full.shape[dims[0]] % param.shape[dims[0]]:
        raise ValueError(f"{name}: cannot shard {tuple(full.shape)} into {tuple(param.shape)}")
    dim, parts = dims[0], full.shape[dims[0]] // param.shape[dims[0]]
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        # gated MLP (dense or expert): each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(parts, 0)[tp_rank], up.chunk(parts, 0)[tp_rank]], 0)
    # qkv: contiguous chunks are whole query groups (needs groups % tp == 0)
    return full.chunk(parts, dim=dim)[tp_rank]


def load_hf_weights(model: GPTModel | list[GPTModel], state_dict_hf: Mapping[str, Tensor],
                    cfg: PretrainedConfig) -> None:
    """Convert HF weights (:func:`hf_to_megatron`) and copy this rank's shard into ``model``.
    Expert e on expert-parallel rank r is global expert r · (E / ep) + e; experts are sliced
    over the expert-tensor-parallel group as dense weights are over the tensor-parallel one.
    ``model``: a GPTModel or this rank's model chunks (:func:`build_gpt_chunks`)."""
    full = hf_to_megatron(state_dict_hf, cfg)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep = parallel_state.get_expert_model_parallel_world_size()
    n_local = hf_num_experts(cfg) // ep
    missing = []
    named = [(global_name(name, layer_offset(chunk)), name, param)
             for chunk in _chunks(model) for name, param in _named_weights(chunk)]
    with torch.no_grad():
        for key, name, param in named:
            rank = tp_rank
            if ".local_experts." in key:
                head, tail = key.split(".local_experts.")
                e, rest = tail.split(".", 1)
                key = f"{head}.local_experts.{ep_rank * n_local + int(e)}.{rest}"
                rank = etp_rank
            if key not in full:
                missing.append(name)
                continue
            src = _shard(name, full[key], param, rank)
            if src.shape != param.shape:
                raise ValueError(f"{name}: converted shape {tuple(src.shape)} != {tuple(param.shape)}")
            param.copy_(src.to(param.dtype))
    if missing:
        raise KeyError(f"no converted weight for {missing}")


# --------------------------------------------------------------------------- log-probs


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


def _attention_mask(attention_mask: Tensor) -> Tensor | None:
    """Megatron's boolean mask [B, 1, T, T], True = masked: causal ∪ padded keys; None (causal
    attention, no mask: flash kernels on GPUs) when every row is right-padded, as the trainer's
    batches are. A real token's keys are then all real, so only padding positions, whose
    outputs are never read, attend differently (to the padding before them)."""
    m = attention_mask.bool()
    if bool((m[:, 1:] <= m[:, :-1]).all()):
        return None
    return _padding_mask(attention_mask)


def _padding_mask(attention_mask: Tensor) -> Tensor:
    """Megatron's boolean mask [B, 1, T, T], True = masked: causal ∪ padded keys."""
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    return ~allowed[:, None]


def megatron_logprobs(model: GPTModel, input_ids: Tensor, attention_mask: Tensor, *,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies) [B, T] — ``runtime.trainer.sequence_logprobs``'s
    convention: logp[b, t] = log softmax(z_{b, t−1})[x_{b, t}], position 0 is 0.

    ``z`` are this rank's vocab shard [B, T, V/tp]; logp = −``vocab_parallel_cross_entropy``.
    Entropy (no grad): H = log Z − Σ_v softmax(z)_v z_v with log Z = m + log Σ exp(z − m),
    m, Σ all-reduced over the tensor-parallel group. Positions: cumsum(mask) − 1 (so left
    padding works); padded keys are masked out.
    """
    if context_parallel.size() > 1:  # this rank's positions; log-probs gathered whole
        return context_parallel.logprobs(model, input_ids, attention_mask,
                                         with_entropy=with_entropy)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if model.config.sequence_parallel and input_ids.shape[1] % tp:
        raise ValueError(f"sequence parallelism splits the {input_ids.shape[1]} positions over "
                         f"{tp} tensor-parallel ranks: pad them to a multiple of {tp}")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, position_ids=position_ids,
                   attention_mask=_attention_mask(attention_mask))  # [B, T, V/tp]
    if not getattr(model, "module", model).post_process:
        return logits, None  # a stage before the last: hidden states for the next stage
    z = logits[:, :-1].float()
    target = input_ids[:, 1:]
    # vocab_parallel_cross_entropy is [s, b] or [b, s] agnostic: it works on the last dim.
    nll = tensor_parallel.vocab_parallel_cross_entropy(z.contiguous(), target)
    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    logp[:, 1:] = -nll
    entropy = None
    if with_entropy:
        entropy = torch.zeros_like(logp)
        with torch.no_grad():
            entropy[:, 1:] = _vocab_parallel_entropy(z)
    return logp, entropy


def _vocab_parallel_entropy(z: Tensor) -> Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    distributed = parallel_state.get_tensor_model_parallel_world_size() > 1
    m = z.max(-1, keepdim=True).values
    if distributed:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(z - m)
    sums = torch.stack([e.sum(-1), (e * z).sum(-1)])
    if distributed:
        torch.distributed.all_reduce(sums, group=group)
    s, ez = sums[0], sums[1]
    return m.squeeze(-1) + torch.log(s) - ez / s



# --------------------------------------------------------------------------- export

# Tensor-parallel split of the GPTModel parameters the local spec shards (experts: over the
# expert-tensor-parallel group, :func:`_expert_tp_dim`); every other parameter is replicated.
_TP_DIM0 = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight",
            "output_layer.weight", "linear_q_proj.weight", "linear_q_down_proj.weight",
            "linear_q_up_proj.weight", "linear_kv_down_proj.weight", "linear_kv_up_proj.weight")
_TP_DIM1 = ("linear_proj.weight",)


def _tp_dim(name: str) -> int | None:
    if ".local_experts." in name:
        return None
    if name.endswith(_TP_DIM0) or name.endswith(("mlp.linear_fc1.weight",
                                                  "shared_experts.linear_fc1.weight")):
        return 0
    if name.endswith(_TP_DIM1) or name.endswith(("mlp.linear_fc2.weight",
                                                  "shared_experts.linear_fc2.weight")):
        return 1
    return None


def _expert_tp_dim(name: str) -> int:
    return 0 if name.endswith(("linear_fc1.weight", "linear_fc1.bias")) else 1


def gather_full_state_dict(model: GPTModel | list[GPTModel]) -> dict[str, Tensor]:
    """The full (TP=1, EP=1) state dict, on every rank: tensor-parallel shards all-gathered
    along their split dim (the gated fc1 as [gate; up] of the rank-wise [gate_r; up_r]),
    local experts likewise over the expert-tensor-parallel group, then all-gathered over the
    expert-parallel group and renumbered globally.
    ``model``: a GPTModel or this rank's model chunks. Collective: every rank of the model
    must call it."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_group = parallel_state.get_expert_model_parallel_group()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    etp_group = parallel_state.get_expert_tensor_parallel_group()
    chunks = _chunks(model)
    n_local = int(chunks[0].config.num_moe_experts or 0) // ep
    out: dict[str, Tensor] = {}
    named = [(global_name(name, layer_offset(chunk)), param)
             for chunk in chunks for name, param in _named_weights(chunk)]
    for name, param in named:
        t = param.detach()
        expert = ".local_experts." in name
        dim = _expert_tp_dim(name) if expert else _tp_dim(name)
        size, group = (etp, etp_group) if expert else (tp, tp_group)
        if dim is not None and size > 1:
            parts = all_gather(t, size, group)
            if name.endswith("linear_fc1.weight"):  # [gate_r; up_r] per rank (dense, shared)
                halves = [p.chunk(2, 0) for p in parts]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
            else:
                t = torch.cat(parts, dim)
        if expert:
            head, tail = name.split(".local_experts.")
            e, rest = tail.split(".", 1)
            for r, part in enumerate(all_gather(t, ep, ep_group)):
                out[f"{head}.local_experts.{r * n_local + int(e)}.{rest}"] = part.clone()
            continue
        out[name] = t.clone()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # every stage's layers
        stages: list[Any] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(
            stages, {k: v.cpu() for k, v in out.items()},
            group=parallel_state.get_pipeline_model_parallel_group())
        out = {k: v.to(param.device) for stage in stages for k, v in stage.items()}
    return out


def _named_weights(model: GPTModel) -> list[tuple[str, Tensor]]:
    """The parameters, and the buffers that are weights too: the routers' selection bias
    (``router.expert_bias``, DeepSeek-V3's ``e_score_correction_bias``; replicated)."""
    return [*model.named_parameters(),
            *((n, b) for n, b in model.named_buffers() if n.endswith("router.expert_bias"))]


def all_gather(t: Tensor, size: int, group: object) -> list[Tensor]:
    """Every rank's ``t`` of a group of ``size`` ranks (``[t]`` when alone)."""
    if size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return parts


def comm_device() -> torch.device:
    """Where collective tensors must live: the GPU for NCCL, the CPU for gloo."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def megatron_to_hf(full: Mapping[str, Tensor], cfg: PretrainedConfig) -> dict[str, Tensor]:
    """Inverse of :func:`hf_to_megatron`: a full GPTModel state dict → HF Qwen3-MoE weights in
    the fused expert layout of transformers 5 (``experts.gate_up_proj`` [E, 2I, H],
    ``experts.down_proj`` [E, H, I]). DeepSeek-V3: :func:`runtime.megatron.deepseek.megatron_to_hf`."""
    if deepseek.is_deepseek(cfg):
        return deepseek.megatron_to_hf(full, cfg)
    heads, groups, d = int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.head_dim)
    hidden, q_rows = int(cfg.hidden_size), heads // groups * d
    out: dict[str, Tensor] = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
                              "model.norm.weight": full["decoder.final_layernorm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = full["output_layer.weight"]
    for i in range(int(cfg.num_hidden_layers)):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = full[m + "self_attention.linear_qkv.weight"].view(groups, q_rows + 2 * d, hidden)
        out[h + "self_attn.q_proj.weight"] = qkv[:, :q_rows].reshape(-1, hidden)
        out[h + "self_attn.k_proj.weight"] = qkv[:, q_rows:q_rows + d].reshape(-1, hidden)
        out[h + "self_attn.v_proj.weight"] = qkv[:, q_rows + d:].reshape(-1, hidden)
        if m + "self_attention.linear_qkv.bias" in full:
            b = full[m + "self_attention.linear_qkv.bias"].view(groups, q_rows + 2 * d)
            out[h + "self_attn.q_proj.bias"] = b[:, :q_rows].reshape(-1)
            out[h + "self_attn.k_proj.bias"] = b[:, q_rows:q_rows + d].reshape(-1)
            out[h + "self_attn.v_proj.bias"] = b[:, q_rows + d:].reshape(-1)
        if m + "self_attention.q_layernorm.weight" in full:
            out[h + "self_attn.q_norm.weight"] = full[m + "self_attention.q_layernorm.weight"]
            out[h + "self_attn.k_norm.weight"] = full[m + "self_attention.k_layernorm.weight"]
        out[h + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        out[h + "input_layernorm.weight"] = full[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"]
        out.update(mlp_to_hf(full, h, m, hf_num_experts(cfg), shared_module=glm.is_glm(cfg)))
    return {k: t.detach().clone().contiguous() for k, t in out.items()}

"""HF ↔ Megatron weights: conversion of a family's HF state dict to and from the full GPTModel
state dict, loading this rank's shard of it and gathering the full one back.

Weight layout (:func:`hf_to_megatron`): ``linear_qkv.weight`` stacks, per query group g,
[q heads of g (heads/groups · d rows), k_g (d rows), v_g (d rows)] — megatron-core's
``SelfAttention.get_query_key_value_tensors`` views the output as
[.., groups, (heads/groups + 2)·d]. Gated ``linear_fc1.weight`` is [gate; up] (the GLU
chunks the output in two). The full state dict is the TP=1/EP=1 layout;
:func:`load_hf_weights` slices it for the local rank along the one dim whose size differs
(column-parallel / vocab: dim 0, row-parallel: dim 1; qkv chunks are whole query groups; the
gated fc1 takes [gate_r; up_r]), picks experts by expert-parallel rank and slices them
likewise over the expert-tensor-parallel group (``etp``; Megatron-LM's default is ETP = TP).
:func:`gather_full_state_dict` is the inverse (the split dims:
:func:`runtime.megatron.model.tp_dim`), :func:`megatron_to_hf` that of
:func:`hf_to_megatron`.

Each conversion works one decoder layer at a time (:func:`layer_to_megatron`,
:func:`layer_to_hf`), and loading and gathering go a layer at a time too
(:func:`gathered_units`): a large model's weights are never whole in one process
(:mod:`runtime.megatron.hf_folder` writes and reads HF folders that way). The MLPs: :mod:`runtime.megatron.hf_mlp`; DeepSeek-V3's attention:
:mod:`runtime.megatron.deepseek`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from torch import Tensor
from transformers import PretrainedConfig

from runtime.megatron import deepseek, glm
from runtime.megatron.args import hf_num_experts
from runtime.megatron.hf_mlp import (
    OUTER_TO_HF,
    mlp_to_hf,
    mlp_to_megatron,
    outer_to_hf,
    outer_to_megatron,
)
from runtime.megatron.model import expert_tp_dim, global_name, layer_offset, model_chunks, tp_dim
from runtime.megatron.parallel import all_gather

__all__ = ["gather_full_state_dict", "gathered_units", "hf_to_megatron", "layer_to_hf",
           "layer_to_megatron", "load_hf_weights", "megatron_to_hf", "outer_hf_name"]


def layer_to_megatron(sd: Mapping[str, Tensor], cfg: PretrainedConfig, i: int,
                      experts: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Decoder layer ``i`` of HF weights → its tensors of the full (TP=1, EP=1) GPTModel
    state dict (layout in the module doc). Accepts both the fused in-memory expert layout of
    transformers 5 (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) and
    the per-expert checkpoint layout (``experts.{e}.{gate,up,down}_proj.weight``);
    ``experts``: only those routed experts (global indices), all by default. DeepSeek-V3:
    :func:`runtime.megatron.deepseek.layer_to_megatron`."""
    if deepseek.is_deepseek(cfg):
        return deepseek.layer_to_megatron(sd, cfg, i, experts)
    heads, groups, d = int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.head_dim)
    hidden = int(cfg.hidden_size)
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    q = sd[h + "self_attn.q_proj.weight"].view(groups, heads // groups * d, hidden)
    k = sd[h + "self_attn.k_proj.weight"].view(groups, d, hidden)
    v = sd[h + "self_attn.v_proj.weight"].view(groups, d, hidden)
    out = {m + "self_attention.linear_qkv.weight": torch.cat([q, k, v], 1).reshape(-1, hidden)}
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
    out.update(mlp_to_megatron(sd, h, m, hf_num_experts(cfg), experts))
    return out


def layer_to_hf(full: Mapping[str, Tensor], cfg: PretrainedConfig, i: int) -> dict[str, Tensor]:
    """Inverse of :func:`layer_to_megatron`: decoder layer ``i`` of a full GPTModel state dict
    → HF weights in the fused expert layout of transformers 5 (``experts.gate_up_proj``
    [E, 2I, H], ``experts.down_proj`` [E, H, I]). DeepSeek-V3:
    :func:`runtime.megatron.deepseek.layer_to_hf`."""
    if deepseek.is_deepseek(cfg):
        return deepseek.layer_to_hf(full, cfg, i)
    heads, groups, d = int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.head_dim)
    hidden, q_rows = int(cfg.hidden_size), heads // groups * d
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    qkv = full[m + "self_attention.linear_qkv.weight"].view(groups, q_rows + 2 * d, hidden)
    out = {h + "self_attn.q_proj.weight": qkv[:, :q_rows].reshape(-1, hidden),
           h + "self_attn.k_proj.weight": qkv[:, q_rows:q_rows + d].reshape(-1, hidden),
           h + "self_attn.v_proj.weight": qkv[:, q_rows + d:].reshape(-1, hidden)}
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
    return out


def hf_to_megatron(state_dict_hf: Mapping[str, Tensor], cfg: PretrainedConfig) -> dict[str, Tensor]:
    """HF weights → the full (TP=1, EP=1) GPTModel state dict: the embedding, final norm and
    output layer, and every decoder layer (:func:`layer_to_megatron`)."""
    out: dict[str, Tensor] = outer_to_megatron(state_dict_hf, bool(cfg.tie_word_embeddings))
    for i in range(int(cfg.num_hidden_layers)):
        out.update(layer_to_megatron(state_dict_hf, cfg, i))
    return {k: t.detach().clone().contiguous() for k, t in out.items()}


def megatron_to_hf(full: Mapping[str, Tensor], cfg: PretrainedConfig) -> dict[str, Tensor]:
    """Inverse of :func:`hf_to_megatron` (:func:`layer_to_hf` per decoder layer)."""
    out: dict[str, Tensor] = outer_to_hf(full, bool(cfg.tie_word_embeddings))
    for i in range(int(cfg.num_hidden_layers)):
        out.update(layer_to_hf(full, cfg, i))
    return {k: t.detach().clone().contiguous() for k, t in out.items()}


def outer_hf_name(name: str, cfg: PretrainedConfig) -> str:
    """The HF name of a weight outside the decoder layers (a tied output layer: the input
    embedding's)."""
    if name == "output_layer.weight" and cfg.tie_word_embeddings:
        return OUTER_TO_HF["embedding.word_embeddings.weight"]
    return OUTER_TO_HF[name]


# One unit of loading and gathering: a decoder layer (its global index) or one weight outside
# the layers (its name), with (global name, local name, tensor) of each of its weights.
Unit = tuple[int | str, list[tuple[str, str, Tensor]]]


def _units(model: GPTModel | list[GPTModel]) -> list[Unit]:
    """This rank's weights grouped by unit, in model order (every rank of a pipeline stage
    lists the same names: the gathers go in this order)."""
    units: dict[int | str, list[tuple[str, str, Tensor]]] = {}
    for chunk in model_chunks(model):
        offset = layer_offset(chunk)
        for name, param in _named_weights(chunk):
            key = global_name(name, offset)
            unit: int | str = (int(key.split(".")[2]) if key.startswith("decoder.layers.")
                               else key)
            units.setdefault(unit, []).append((key, name, param))
    return list(units.items())


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
    """Copy this rank's shard of HF weights into ``model``, a decoder layer at a time
    (:func:`layer_to_megatron`, reading only the layers and experts this rank holds: a lazy
    ``state_dict_hf`` such as :class:`runtime.megatron.hf_folder.FolderTensors` reads nothing
    else). Expert e on expert-parallel rank r is global expert r · (E / ep) + e; experts are
    sliced over the expert-tensor-parallel group as dense weights are over the
    tensor-parallel one. ``model``: a GPTModel or this rank's model chunks
    (:func:`build_gpt_chunks`). Tied embeddings over pipeline stages: the last stage's output
    layer is its copy of the embedding (megatron-core all-reduces the two copies'
    gradients)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep = parallel_state.get_expert_model_parallel_world_size()
    n_local = hf_num_experts(cfg) // ep
    mine = [ep_rank * n_local + e for e in range(n_local)]
    missing = []
    with torch.no_grad():
        for unit, weights in _units(model):
            if isinstance(unit, str):
                full = {unit: state_dict_hf[outer_hf_name(unit, cfg)]}
            else:
                full = layer_to_megatron(state_dict_hf, cfg, unit, mine)
            for key, name, param in weights:
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
                    raise ValueError(f"{name}: converted shape {tuple(src.shape)} != "
                                     f"{tuple(param.shape)}")
                param.copy_(src.to(param.dtype))
    if missing:
        raise KeyError(f"no converted weight for {missing}")


def _gather(key: str, param: Tensor, n_local: int) -> list[tuple[str, Tensor]]:
    """The full tensor(s) of one weight, by global name: tensor-parallel shards all-gathered
    along their split dim (the gated fc1 as [gate; up] of the rank-wise [gate_r; up_r]), a
    local expert over the expert-tensor-parallel group likewise and then over the
    expert-parallel group, one full tensor per expert-parallel rank. Collective over those
    groups."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    t = param.detach()
    expert = ".local_experts." in key
    dim = expert_tp_dim(key) if expert else tp_dim(key)
    size, group = ((etp, parallel_state.get_expert_tensor_parallel_group()) if expert
                   else (tp, parallel_state.get_tensor_model_parallel_group()))
    if dim is not None and size > 1:
        parts = all_gather(t, size, group)
        if key.endswith("linear_fc1.weight"):  # [gate_r; up_r] per rank (dense, shared)
            halves = [p.chunk(2, 0) for p in parts]
            t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
        else:
            t = torch.cat(parts, dim)
    if not expert:
        return [(key, t)]
    head, tail = key.split(".local_experts.")
    e, rest = tail.split(".", 1)
    return [(f"{head}.local_experts.{r * n_local + int(e)}.{rest}", part)
            for r, part in enumerate(all_gather(t, ep, parallel_state.get_expert_model_parallel_group()))]


def gathered_units(model: GPTModel | list[GPTModel], *, keep: bool = True,
                   device: torch.device | str | None = None
                   ) -> Iterator[tuple[int | str, dict[str, Tensor]]]:
    """This rank's pipeline stage, one unit at a time: (decoder layer index, or the name of a
    weight outside the layers; its full tensors by global name, copies on ``device``, by
    default the parameters'). Holds one unit's tensors at most; ``keep=False`` drops them (a
    rank that only takes part in the gathers). Collective over the stage's tensor- and
    expert-parallel groups: every rank of the stage iterates it to the end."""
    n_local = int(model_chunks(model)[0].config.num_moe_experts or 0) \
        // parallel_state.get_expert_model_parallel_world_size()
    for unit, weights in _units(model):
        full: dict[str, Tensor] = {}
        for key, _, param in weights:
            for name, t in _gather(key, param, n_local):
                if keep:
                    full[name] = t.to(device or t.device, copy=True)
        yield unit, full


def gather_full_state_dict(model: GPTModel | list[GPTModel]) -> dict[str, Tensor]:
    """The full (TP=1, EP=1) state dict, on every rank (:func:`gathered_units` of every
    pipeline stage). For tests and small models: it holds the whole model on every rank.
    ``model``: a GPTModel or this rank's model chunks. Collective: every rank of the model
    must call it."""
    out: dict[str, Tensor] = {}
    for _, full in gathered_units(model):
        out.update(full)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # every stage's layers
        device = next(iter(out.values())).device
        stages: list[Any] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(
            stages, {k: v.cpu() for k, v in out.items()},
            group=parallel_state.get_pipeline_model_parallel_group())
        out = {k: v.to(device) for stage in stages for k, v in stage.items()}
    return out


def _named_weights(model: GPTModel) -> list[tuple[str, Tensor]]:
    """The parameters, and the buffers that are weights too: the routers' selection bias
    (``router.expert_bias``, DeepSeek-V3's ``e_score_correction_bias``; replicated)."""
    return [*model.named_parameters(),
            *((n, b) for n, b in model.named_buffers() if n.endswith("router.expert_bias"))]

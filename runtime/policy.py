"""The embedded policy: a character-level tokenizer and a small HF model of a standard family.

The tiny run's policy is a real ``Qwen3MoeForCausalLM`` (or ``Qwen3ForCausalLM`` for a dense
``qwen3`` spec, ``LlamaForCausalLM``, ``DeepseekV3ForCausalLM``, ``Glm4MoeForCausalLM``) built
from the spec's ``model.architecture`` with random weights; nothing is downloaded. Checkpoints are ordinary HF folders (config.json, model.safetensors in the
original per-expert layout, generation_config.json, tokenizer.json, tokenizer_config.json)
that ``AutoModelForCausalLM`` / ``AutoTokenizer`` / vLLM load as is.

Tokenizer: one token per character. Ids::

    0 <pad>   1 <bos>   2 <eos>   3 <unk>
    4…13 "0"…"9"   14 "+"   15 "-"   16 "*"   17 "="   18 " "

ids 19 … vocab_size−1 are unused (the model's embedding has vocab_size rows; decoding an
unused id yields nothing). Encoding adds no special tokens — ``encode("37+58=")`` is six ids
— so prompt and response tokens line up with characters; a response ends with ``<eos>``.
``<bos>`` exists for engines that want one but is never inserted automatically. Characters
outside the vocabulary encode as ``<unk>``.

Architecture mapping (spec ``model.architecture`` → transformers config)::

    num_layers → num_hidden_layers          hidden_size → hidden_size
    ffn_hidden_size → intermediate_size     num_attention_heads → num_attention_heads
    num_query_groups → num_key_value_heads  head_dim → head_dim (default hidden/heads)
    vocab_size, max_position_embeddings     rope_theta → rope_parameters.rope_theta
    tie_embeddings → tie_word_embeddings
    moe.num_experts → num_experts           moe.top_k → num_experts_per_tok
    moe.expert_ffn_hidden_size → moe_intermediate_size
    moe.norm_topk_prob → norm_topk_prob     moe.aux_loss_coeff → router_aux_loss_coef
    moe.first_dense_layers = k → mlp_only_layers = [0 … k−1], decoder_sparse_step = 1

Qwen3-MoE has a softmax router, no expert bias and no shared experts: a spec asking for
those is rejected rather than silently built as something else.

``family: deepseek_v3`` (DeepSeek-V3, Moonlight) builds ``DeepseekV3ForCausalLM``: multi-head
latent attention and a sigmoid router with the selection bias ``e_score_correction_bias``::

    mla.q_lora_rank → q_lora_rank (none: full-rank q_proj)   mla.kv_lora_rank → kv_lora_rank
    mla.qk_head_dim → qk_nope_head_dim     mla.qk_pos_emb_head_dim → qk_rope_head_dim
    mla.v_head_dim → v_head_dim            num_key_value_heads = num_attention_heads
    moe.num_experts → n_routed_experts     moe.shared_experts → n_shared_experts
    moe.first_dense_layers → first_k_dense_replace
    moe.routed_scaling_factor → routed_scaling_factor
    moe.num_groups / group_top_k → n_group / topk_group (none: 1 / 1, no group limit)
    rope_interleave = True (the DeepSeek layout; megatron-core's MLA de-interleaves the same way)

The HF model always has the bias buffer (zeros); ``moe.expert_bias: false`` keeps it at zero.
It has one shared-expert MLP of n_shared_experts × moe_intermediate_size, so a
``shared_expert_ffn_hidden_size`` other than that product is rejected, and its router always
scores with sigmoid and applies the group limit with DeepSeek's top-2 group score.

``family: llama`` builds ``LlamaForCausalLM`` (dense, grouped-query attention without q/k
norms, no biases): the GQA mapping above, ``attention_bias = mlp_bias = False``.

``family: glm4_moe`` (GLM-4.5, GLM-4.5-Air) builds ``Glm4MoeForCausalLM``: grouped-query
attention with a bias on q/k/v (``attention_bias = True``, both published checkpoints),
per-head q/k RMSNorm with ``qk_norm: true`` (``use_qk_norm``: GLM-4.5 355B has it, GLM-4.5-Air
and HF's default not), RoPE on the first half of each head only, and
DeepSeek-V3's MoE (the same router, ``Glm4MoeTopkRouter``: sigmoid, selection bias, group
limit, routed scaling; shared experts; leading dense layers) under the same names::

    partial_rotary_factor → rope_parameters.partial_rotary_factor (none: GLM-4.5's 0.5;
        rotated dims = int(head_dim · factor), the first ones of each head, rotate-half layout)
    moe.* → n_routed_experts, n_shared_experts, first_k_dense_replace, routed_scaling_factor,
        n_group / topk_group as for deepseek_v3; num_nextn_predict_layers = 0 (no MTP layer)

``partial_rotary_factor`` other than 1 on another family is rejected (their HF classes rotate
every dimension), and so is a ``qk_norm`` other than the family's (Qwen3: always, Llama: never).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from runtime.files import atomic_dir

__all__ = [
    "CHARACTERS",
    "SPECIAL_TOKENS",
    "SUPPORTED_FAMILIES",
    "build_policy",
    "build_tokenizer",
    "count_parameters",
    "load_policy",
    "policy_config",
    "portable_config",
    "save_policy",
    "save_tokenizer",
]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = "0123456789+-*= "
SUPPORTED_FAMILIES = ("qwen3_moe", "qwen3", "llama", "deepseek_v3", "glm4_moe")
# GLM-4.5's share of each head's dimensions that RoPE rotates (``partial_rotary_factor``)
GLM4_MOE_PARTIAL_ROTARY = 0.5
# tokenizer_config.json names the generic fast tokenizer, which transformers 4.x and 5.x
# both resolve (5.x would write its own class name, "TokenizersBackend", unknown to 4.x —
# the version a separate vLLM environment may have).
_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(vocab_size: int, *, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """The character-level tokenizer (ids in the module doc); ``vocab_size`` is the model's
    embedding size and must hold every token."""
    tokens = [*SPECIAL_TOKENS, *CHARACTERS]
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is too small for the character tokenizer: "
                         f"it needs {len(tokens)} ids ({len(SPECIAL_TOKENS)} special + "
                         f"{len(CHARACTERS)} characters)")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own piece ([\s\S] also matches newlines, unlike ".").
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    kwargs: dict[str, Any] = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", clean_up_tokenization_spaces=False, **kwargs)
    return tok


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike[str]) -> None:
    """``save_pretrained`` with a tokenizer_class every transformers version resolves."""
    tokenizer.save_pretrained(path)
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = _TOKENIZER_CLASS
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- model


def _get(arch: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = arch.get(key)
    return default if value is None else value


def policy_config(arch: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The transformers config of the spec's ``model.architecture`` (mapping in the module
    doc): ``Qwen3MoeConfig`` for family qwen3_moe, ``Qwen3Config`` for a dense qwen3,
    ``LlamaConfig`` for llama, ``DeepseekV3Config`` for deepseek_v3, ``Glm4MoeConfig`` for
    glm4_moe."""
    family = arch.get("family")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model.architecture.family {family!r} is not supported by the embedded "
                         f"engine (local trainer / rollout); supported: "
                         f"{', '.join(SUPPORTED_FAMILIES)}")
    rotary = arch.get("partial_rotary_factor")
    if rotary is not None and family != "glm4_moe" and float(rotary) != 1.0:
        raise ValueError(f"family {family} rotates every head dimension: "
                         f"partial_rotary_factor {rotary} applies to glm4_moe only")
    qk_norm = arch.get("qk_norm")
    if qk_norm is not None and family != "glm4_moe" and bool(qk_norm) != (family != "llama"):
        raise ValueError(f"family {family} {'never' if family == 'llama' else 'always'} "
                         f"normalises queries and keys: qk_norm {qk_norm} applies to glm4_moe only")
    if family == "deepseek_v3":
        return _deepseek_v3_config(arch, tokenizer)
    if _get(arch, "attention", "gqa") != "gqa":
        raise ValueError(f"family {family} uses grouped-query attention, not {arch['attention']!r}")
    common = _gqa_common(arch, tokenizer)
    moe = arch.get("moe")
    if family in ("qwen3", "llama"):
        if moe is not None:
            raise ValueError(f"family {family} is dense but a moe section is given"
                             + (": use qwen3_moe" if family == "qwen3" else ""))
        if family == "llama":
            return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
        return Qwen3Config(**common, use_sliding_window=False)
    if moe is None:
        raise ValueError(f"family {family} needs a model.architecture.moe section")
    if family == "glm4_moe":
        rope = dict(common.pop("rope_parameters"))
        rope["partial_rotary_factor"] = float(GLM4_MOE_PARTIAL_ROTARY if rotary is None else rotary)
        return Glm4MoeConfig(**common, rope_parameters=rope, attention_bias=True,
                             use_qk_norm=bool(qk_norm), **_sigmoid_moe(arch, "GLM-4.5"))
    if _get(moe, "score_function", "softmax") != "softmax":
        raise ValueError(f"Qwen3-MoE routes with softmax, not {moe['score_function']!r}")
    if _get(moe, "expert_bias", False):
        raise ValueError("Qwen3-MoE has no router expert bias (moe.expert_bias)")
    if _get(moe, "shared_experts", 0):
        raise ValueError("Qwen3-MoE has no shared experts (moe.shared_experts)")
    if float(_get(moe, "routed_scaling_factor", 1.0)) != 1.0:
        raise ValueError("Qwen3-MoE does not scale its gates (moe.routed_scaling_factor)")
    if moe.get("num_groups") is not None:
        raise ValueError("Qwen3-MoE has no group-limited routing (moe.num_groups)")
    first_dense = int(_get(moe, "first_dense_layers", 0))
    if first_dense >= common["num_hidden_layers"]:
        raise ValueError(f"moe.first_dense_layers {first_dense} leaves no MoE layer")
    return Qwen3MoeConfig(
        **common,
        use_sliding_window=False,
        num_experts=int(moe["num_experts"]),
        num_experts_per_tok=int(moe["top_k"]),
        moe_intermediate_size=int(moe["expert_ffn_hidden_size"]),
        norm_topk_prob=bool(_get(moe, "norm_topk_prob", True)),
        router_aux_loss_coef=float(_get(moe, "aux_loss_coeff", 0.0)),
        decoder_sparse_step=1,  # every layer MoE except mlp_only_layers
        mlp_only_layers=list(range(first_dense)),
    )


def _gqa_common(arch: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Config fields of the grouped-query-attention families (Qwen3, Llama, GLM-4.5)."""
    hidden, heads = int(arch["hidden_size"]), int(arch["num_attention_heads"])
    head_dim = arch.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                             f"{heads}: give head_dim")
        head_dim = hidden // heads
    return {**_common(arch, tokenizer),
            "num_key_value_heads": int(_get(arch, "num_query_groups", heads)),
            "head_dim": int(head_dim)}


def _common(arch: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    vocab = int(arch["vocab_size"])
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return {
        "vocab_size": vocab,
        "hidden_size": int(arch["hidden_size"]),
        "intermediate_size": int(arch["ffn_hidden_size"]),
        "num_hidden_layers": int(arch["num_layers"]),
        "num_attention_heads": int(arch["num_attention_heads"]),
        "max_position_embeddings": int(_get(arch, "max_position_embeddings", 32768)),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": float(_get(arch, "rope_theta", 1_000_000.0))},
        "tie_word_embeddings": bool(_get(arch, "tie_embeddings", False)),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _sigmoid_moe(arch: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The MoE fields DeepSeek-V3 and GLM-4.5 share (one naming in both HF configs): a sigmoid
    router with the selection bias, optional group limit, shared experts of n_shared_experts ×
    moe_intermediate_size and the leading dense layers ``first_k_dense_replace``."""
    moe = arch["moe"]
    if _get(moe, "score_function", "softmax") != "sigmoid":
        raise ValueError(f"{name} routes with sigmoid, not {moe.get('score_function')!r}")
    shared = int(_get(moe, "shared_experts", 0))
    expert_ffn = int(moe["expert_ffn_hidden_size"])
    shared_ffn = moe.get("shared_expert_ffn_hidden_size")
    if shared_ffn is not None and int(shared_ffn) != shared * expert_ffn:
        raise ValueError(f"{name}'s shared-expert MLP is shared_experts × "
                         f"expert_ffn_hidden_size = {shared * expert_ffn} wide, not "
                         f"moe.shared_expert_ffn_hidden_size {shared_ffn}")
    first_dense = int(_get(moe, "first_dense_layers", 0))
    if first_dense >= int(arch["num_layers"]):
        raise ValueError(f"moe.first_dense_layers {first_dense} leaves no MoE layer")
    groups = moe.get("num_groups")
    return dict(
        n_routed_experts=int(moe["num_experts"]),
        num_experts_per_tok=int(moe["top_k"]),
        moe_intermediate_size=expert_ffn,
        n_shared_experts=shared,
        first_k_dense_replace=first_dense,
        norm_topk_prob=bool(_get(moe, "norm_topk_prob", True)),
        routed_scaling_factor=float(_get(moe, "routed_scaling_factor", 1.0)),
        n_group=1 if groups is None else int(groups),
        topk_group=1 if groups is None else int(moe["group_top_k"]),
        num_nextn_predict_layers=0,
    )


def _deepseek_v3_config(arch: Mapping[str, Any],
                        tokenizer: PreTrainedTokenizerFast) -> DeepseekV3Config:
    """``DeepseekV3Config`` of a deepseek_v3 architecture (mapping in the module doc)."""
    if _get(arch, "attention", "gqa") != "mla" or arch.get("mla") is None:
        raise ValueError("family deepseek_v3 uses multi-head latent attention: set attention: mla "
                         "and give the mla section")
    if arch.get("moe") is None:
        raise ValueError("family deepseek_v3 needs a model.architecture.moe section")
    mla = arch["mla"]
    heads = int(arch["num_attention_heads"])
    return DeepseekV3Config(
        **_common(arch, tokenizer),
        num_key_value_heads=heads,
        q_lora_rank=None if mla.get("q_lora_rank") is None else int(mla["q_lora_rank"]),
        kv_lora_rank=int(mla["kv_lora_rank"]),
        qk_nope_head_dim=int(mla["qk_head_dim"]),
        qk_rope_head_dim=int(mla["qk_pos_emb_head_dim"]),
        v_head_dim=int(mla["v_head_dim"]),
        rope_interleave=True,
        **_sigmoid_moe(arch, "DeepSeek-V3"),
    )


_MODEL_CLASSES: dict[type, type] = {
    Qwen3MoeConfig: Qwen3MoeForCausalLM, Qwen3Config: Qwen3ForCausalLM,
    LlamaConfig: LlamaForCausalLM, DeepseekV3Config: DeepseekV3ForCausalLM,
    Glm4MoeConfig: Glm4MoeForCausalLM,
}


def build_policy(arch: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast,
                 seed: int) -> PreTrainedModel:
    """Random-initialised float32 policy; the same seed gives the same weights. The global
    torch RNG is left as it was."""
    config = policy_config(arch, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[type(config)](config)
    model.to(torch.float32)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return model.eval()


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                path: str | os.PathLike[str], **marker_info: Any) -> Path:
    """Write an HF checkpoint folder atomically (``runtime.jobs.common.atomic_dir``: the folder
    appears complete, with its ``.complete`` marker, or not at all). Weights go to
    model.safetensors (transformers 5 always writes safetensors)."""
    final = Path(path)
    with atomic_dir(final, artifact="hf_checkpoint", **marker_info) as tmp:
        model.save_pretrained(tmp)
        portable_config(tmp / "config.json")
        save_tokenizer(tokenizer, tmp)
    return final


def checkpoint_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_policy` writes, by the names it writes them under (HF's
    on-disk layout, e.g. one tensor per expert; tied copies left out), without writing
    them: what the engines read from a folder, for the engines that map them instead
    (``weight_sync: ipc``). They share the model's memory."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    return dict(revert_weight_conversion(model, state))


def policy_from_state_dict(config: PretrainedConfig,
                           state_dict: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """The HF model of ``config`` holding ``state_dict`` (HF names), without a second copy of
    the weights: the model is built on the meta device and takes the tensors themselves.
    For :func:`save_policy` (which writes HF's on-disk layout, e.g. one tensor per expert).
    A tied model (``tie_word_embeddings``) takes its output layer from the input embedding:
    the state dict may leave ``lm_head.weight`` out (a Megatron export has one tensor)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) \
        if getattr(config, "tie_word_embeddings", False) else set()
    result = model.load_state_dict(dict(state_dict), assign=True, strict=False)
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(f"state dict does not fit {type(model).__name__}: missing "
                           f"{sorted(missing)}, unexpected {sorted(result.unexpected_keys)}")
    if tied:
        model.tie_weights()  # assign replaced the parameters: tie them again
    return model.eval()


def portable_config(path: Path) -> None:
    """Add the transformers-4.x names of renamed fields next to the 5.x ones, so readers on
    either version (a separate vLLM environment) build the same model: 5.x writes
    ``num_local_experts`` (attribute_map of ``num_experts``), ``rope_parameters`` and
    ``dtype``; 4.x and published Qwen3-MoE configs use ``num_experts``, ``rope_theta`` and
    ``torch_dtype``. 5.x reads the duplicates back consistently."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if "num_local_experts" in cfg:
        cfg.setdefault("num_experts", cfg["num_local_experts"])
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_policy(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """(model in eval mode, tokenizer) from an HF checkpoint folder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no HF checkpoint at {path} (config.json missing)")
    # use_kernels=False: transformers ≥ 5.25 otherwise fetches "hub kernels" from the Hugging
    # Face Hub on CUDA (no network on compute nodes; without the `kernels` package it raises)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total, routed experts, embeddings (input + untied output), and
    active per token = total − experts · (1 − top_k / num_experts)."""
    total = expert = embedding = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if ".mlp.experts." in name:
            expert += n
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            embedding += n
    cfg = getattr(model, "config", None)
    experts = getattr(cfg, "num_experts", 0) or getattr(cfg, "n_routed_experts", 0) or 0
    top_k = getattr(cfg, "num_experts_per_tok", 0) or 0
    active = total - (expert - expert * top_k // experts if experts else 0)
    return {"total": total, "expert": expert, "embedding": embedding, "active": active}

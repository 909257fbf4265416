"""The model families each engine builds, and the rules on ``model.architecture``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from runtime.capabilities.refusal import (
    ARCH,
    MOE,
    Refusal,
    _uses_embedded_trainer,
    _uses_megatron,
)

# HF families the embedded engine builds and serves (runtime.policy: Qwen3MoeForCausalLM,
# Qwen3ForCausalLM, LlamaForCausalLM, DeepseekV3ForCausalLM, Glm4MoeForCausalLM) and the ones
# runtime.megatron builds as a megatron-core GPTModel (runtime.megatron.model, .deepseek, .glm).
EMBEDDED_FAMILIES: tuple[str, ...] = ("qwen3_moe", "qwen3", "llama", "deepseek_v3", "glm4_moe")
MEGATRON_FAMILIES: tuple[str, ...] = ("qwen3_moe", "qwen3", "llama", "deepseek_v3", "glm4_moe")
DENSE_FAMILIES: tuple[str, ...] = ("qwen3", "llama")
# Families with DeepSeek-V3's MoE (sigmoid router with the selection bias, shared experts of
# shared_experts × the expert width, first_k_dense_replace), by their papers' names.
SIGMOID_MOE_FAMILIES: dict[str, str] = {"deepseek_v3": "DeepSeek-V3", "glm4_moe": "GLM-4.5"}

# What each family's attention has, as the trainer's flags say it (train.sh: --qk-layernorm,
# --add-qkv-bias, --rotary-percent; runtime.megatron.args checks them against the checkpoint).
QK_NORM_FAMILIES: tuple[str, ...] = ("qwen3_moe", "qwen3", "deepseek_v3")  # MLA: q_a/kv_a norms
QKV_BIAS_FAMILIES: tuple[str, ...] = ("glm4_moe",)
# partial_rotary_factor of the families that rotate part of each head (unset in the spec: this)
PARTIAL_ROTARY: dict[str, float] = {"glm4_moe": 0.5}


def qk_norm(arch: Mapping[str, Any]) -> bool:
    """Whether the attention normalises q and k per head: ``qk_norm``, or the family's."""
    value = arch.get("qk_norm")
    return arch["family"] in QK_NORM_FAMILIES if value is None else bool(value)


def rotary_percent(arch: Mapping[str, Any]) -> float:
    """The share of each head's dimensions RoPE rotates: ``partial_rotary_factor``, or the
    family's (GLM-4.5: 0.5; the others rotate every dimension)."""
    factor = arch.get("partial_rotary_factor")
    return float(PARTIAL_ROTARY.get(arch["family"], 1.0) if factor is None else factor)


# The attention each trainer (``train.backend``) builds, for the compiler's memory estimate:
# runtime.megatron builds megatron-core's local layer spec (no TransformerEngine) with its
# core attention replaced by torch's scaled_dot_product_attention (runtime.megatron.attention;
# "sdpa"): flash / memory-efficient kernels on GPUs, no [b, heads, s, s] score matrix, and no
# mask for the trainer's right-padded batches. ("local", megatron-core's unfused
# DotProductAttention that materialises the scores, is what it built before.) The embedded
# trainer runs HF's default attention, also SDPA, on the CPU (not estimated: CPU runs only).
TRAINER_ATTENTION: dict[str, str] = {"megatron": "sdpa", "local": "sdpa"}


def _family_features(spec: Mapping[str, Any], engine: str, families: Sequence[str],
                     way_out: str) -> Iterator[Refusal]:
    """Features of ``model.architecture`` outside what an engine builds for its family."""
    rule = "embedded_model" if engine.startswith("the embedded") else "megatron_model"
    arch = spec["model"]["architecture"]
    family = arch["family"]
    if family not in families:
        yield Refusal(rule, (*ARCH, "family"),
                      f"{engine} builds the {', '.join(families)} families, not {family}",
                      way_out)
        return
    if family not in PARTIAL_ROTARY and rotary_percent(arch) != 1.0:
        yield Refusal(rule, (*ARCH, "partial_rotary_factor"),
                      f"{family} rotates every dimension of each head; {engine} has no partial "
                      f"RoPE ({arch['partial_rotary_factor']}) for it",
                      "remove model.architecture.partial_rotary_factor (glm4_moe takes it)")
    if (family != "glm4_moe" and arch.get("qk_norm") is not None
            and arch["qk_norm"] != (family in QK_NORM_FAMILIES)):
        yield Refusal(rule, (*ARCH, "qk_norm"),
                      f"{family} {'always' if family in QK_NORM_FAMILIES else 'never'} normalises "
                      f"queries and keys per head; {engine} builds it so, not with qk_norm "
                      f"{arch['qk_norm']}", "remove model.architecture.qk_norm (glm4_moe takes it)")
    if family == "deepseek_v3":
        yield from _deepseek_features(spec, engine, rule)
        return
    if arch["attention"] != "gqa":
        yield Refusal(rule, (*ARCH, "attention"),
                      f"{engine} builds {family} with grouped-query attention, not "
                      f"{arch['attention']}", "set attention: gqa, or family: deepseek_v3")
    moe = arch.get("moe")
    if family in DENSE_FAMILIES and moe is not None:
        yield Refusal(rule, MOE, f"family {family} is dense but a moe section is given",
                      "remove the moe section, or set model.architecture.family: "
                      + ("qwen3_moe" if family == "qwen3" else "qwen3_moe or glm4_moe"))
    if family not in DENSE_FAMILIES and moe is None:
        yield Refusal(rule, (*ARCH, "family"), f"family {family} needs a moe section",
                      "add model.architecture.moe, or set family: qwen3 or llama for a dense "
                      "model")
    if moe is None:
        return
    if family == "glm4_moe":
        yield from _sigmoid_moe_features(spec, engine, rule)
        return
    if moe["score_function"] != "softmax":
        yield Refusal(rule, (*MOE, "score_function"),
                      f"Qwen3-MoE routes with softmax; {engine} has no "
                      f"{moe['score_function']} router for it",
                      "set moe.score_function: softmax, or family: glm4_moe / deepseek_v3")
    if moe["expert_bias"]:
        yield Refusal(rule, (*MOE, "expert_bias"),
                      f"Qwen3-MoE has no expert-selection bias; {engine} would ignore it",
                      "set moe.expert_bias: false")
    if moe["shared_experts"] or moe.get("shared_expert_ffn_hidden_size") is not None:
        yield Refusal(rule, (*MOE, "shared_experts"),
                      f"Qwen3-MoE has no shared experts; {engine} would not build them",
                      "set moe.shared_experts: 0 and remove moe.shared_expert_ffn_hidden_size")
    if moe.get("routed_scaling_factor", 1.0) != 1.0:
        yield Refusal(rule, (*MOE, "routed_scaling_factor"),
                      f"Qwen3-MoE does not scale its gates; {engine} would ignore the factor",
                      "set moe.routed_scaling_factor: 1.0")
    if moe.get("num_groups") is not None:
        yield Refusal(rule, (*MOE, "num_groups"),
                      f"Qwen3-MoE has no group-limited routing; {engine} would ignore it",
                      "remove moe.num_groups and moe.group_top_k")


def _deepseek_features(spec: Mapping[str, Any], engine: str, rule: str) -> Iterator[Refusal]:
    """DeepSeek-V3 / Moonlight as HF ``DeepseekV3ForCausalLM`` builds it (and megatron-core
    from it): MLA and DeepSeek-V3's MoE (:func:`_sigmoid_moe_features`)."""
    arch = spec["model"]["architecture"]
    if arch["attention"] != "mla":
        yield Refusal(rule, (*ARCH, "attention"),
                      f"DeepSeek-V3 uses multi-head latent attention; {engine} has no "
                      f"{arch['attention']} variant of it", "set attention: mla and an mla section")
    if arch.get("moe") is None:
        yield Refusal(rule, (*ARCH, "family"), "family deepseek_v3 needs a moe section",
                      "add model.architecture.moe")
        return
    yield from _sigmoid_moe_features(spec, engine, rule)


def _sigmoid_moe_features(spec: Mapping[str, Any], engine: str, rule: str) -> Iterator[Refusal]:
    """DeepSeek-V3's MoE, which GLM-4.5 shares: a sigmoid router, one shared-expert MLP of
    shared_experts × the expert width. The Megatron trainer renormalises a sigmoid top-k
    always; the embedded trainer keeps the selection bias fixed (it has no update rule)."""
    arch = spec["model"]["architecture"]
    name = SIGMOID_MOE_FAMILIES[arch["family"]]
    moe = arch["moe"]
    if moe["score_function"] != "sigmoid":
        yield Refusal(rule, (*MOE, "score_function"),
                      f"{name} routes with sigmoid; {engine} has no {moe['score_function']} "
                      "router for it", "set moe.score_function: sigmoid")
    width = moe.get("shared_expert_ffn_hidden_size")
    if width is not None and width != moe["shared_experts"] * moe["expert_ffn_hidden_size"]:
        yield Refusal(rule, (*MOE, "shared_expert_ffn_hidden_size"),
                      f"{name}'s shared-expert MLP is shared_experts × expert_ffn_hidden_size "
                      f"= {moe['shared_experts'] * moe['expert_ffn_hidden_size']} wide, not {width}",
                      "remove moe.shared_expert_ffn_hidden_size")
    if rule == "megatron_model" and not moe["norm_topk_prob"] and moe["top_k"] > 1:
        yield Refusal(rule, (*MOE, "norm_topk_prob"),
                      "megatron-core 0.16.1 always renormalises a sigmoid router's top-k gates",
                      "set moe.norm_topk_prob: true, or train.backend: local")
    if rule == "embedded_model" and _uses_embedded_trainer(spec) and moe["expert_bias"]:
        yield Refusal(rule, (*MOE, "expert_bias"),
                      "the embedded trainer keeps the expert-selection bias fixed: it has no "
                      f"update rule for it (the Megatron trainer applies {name}'s, "
                      "DeepSeek-V3's)",
                      "set moe.expert_bias: false (the checkpoint's bias is still used), or "
                      "train.backend: megatron")


def embedded_model(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The embedded engine (init, SFT, screen, eval; the local trainer and rollout server)
    builds HF Qwen3-MoE / Qwen3 / Llama / DeepSeek-V3 / GLM-4.5 models (``runtime.policy``)."""
    yield from _family_features(spec, "the embedded engine", EMBEDDED_FAMILIES,
                                "set model.architecture.family: one of "
                                + ", ".join(EMBEDDED_FAMILIES))


def megatron_model(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """``runtime.megatron`` builds Qwen3-MoE, Qwen3, Llama, DeepSeek-V3 (MLA) and GLM-4.5 as a
    megatron-core GPTModel (local layer spec), with Megatron-LM's integer RoPE base
    (``--rotary-base``)."""
    if _uses_megatron(spec):
        yield from _family_features(spec, "the Megatron trainer", MEGATRON_FAMILIES,
                                    "set train.backend: local, or family: one of "
                                    + ", ".join(MEGATRON_FAMILIES))
        theta = float(spec["model"]["architecture"]["rope_theta"])
        if not theta.is_integer():
            # train.sh would render int(theta), and the trainer refuse the checkpoint's theta
            yield Refusal("megatron_model", (*ARCH, "rope_theta"),
                          f"Megatron-LM's --rotary-base is an integer: the Megatron trainer "
                          f"cannot build rope_theta {theta}",
                          f"set model.architecture.rope_theta: {round(theta)}.0, or "
                          "train.backend: local")


def dense_replay(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Router replay (r2 / r3) records and replays the experts each MoE layer's router
    chooses: a dense model (no ``moe`` section: qwen3, llama) has no router, and neither
    trainer nor engine has anything to record or replay."""
    mode = spec["router_replay"]["mode"]
    arch = spec["model"]["architecture"]
    if mode != "off" and arch.get("moe") is None:
        yield Refusal("dense_replay", ("router_replay", "mode"),
                      f"router replay {mode} on a dense model (family {arch['family']}, no "
                      "moe section): it has no routers whose experts could be recorded or "
                      "replayed", "set router_replay.mode: off, or give the model a moe section")


def aux_loss(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Neither trainer adds the load-balancing auxiliary loss yet: the embedded trainer has
    none, and the Megatron engine builds its routers with ``moe_aux_loss_coeff = 0``."""
    moe = spec["model"]["architecture"].get("moe")
    if moe is not None and moe["aux_loss_coeff"] > 0:
        yield Refusal("aux_loss", (*MOE, "aux_loss_coeff"),
                      f"the {spec['train']['backend']} trainer does not add the load-balancing "
                      f"auxiliary loss: coefficient {moe['aux_loss_coeff']} would be ignored",
                      "set moe.aux_loss_coeff: 0 (router replay keeps routing stable in RL)")

"""One decoder layer's MLP between HF's names and Megatron's, for every family (Qwen3, Llama,
Qwen3-MoE, DeepSeek-V3, GLM-4.5 name their MLPs alike)::

    mlp.{gate,up}_proj, mlp.down_proj          → mlp.linear_fc1 ([gate; up]), mlp.linear_fc2
        (a dense layer: the dense families, the leading dense layers of the MoE ones)
    mlp.gate.weight                            → mlp.router.weight
    mlp.gate.e_score_correction_bias           → mlp.router.expert_bias (sigmoid routers)
    mlp.experts.gate_up_proj [E, 2I, H] | mlp.experts.{e}.{gate,up}_proj
                                               → mlp.experts.local_experts.{e}.linear_fc1
    mlp.experts.down_proj [E, H, I] | mlp.experts.{e}.down_proj
                                               → mlp.experts.local_experts.{e}.linear_fc2
    mlp.shared_experts.{gate,up,down}_proj     → mlp.shared_experts.linear_fc1 ([gate; up]),
                                                 linear_fc2 (DeepSeek-V3, GLM-4.5)

HF → Megatron accepts transformers 5's fused in-memory experts and the per-expert checkpoint
layout; Megatron → HF writes the fused one. DeepSeek-V3 and GLM-4.5 always build a
shared-expert MLP, zero wide without shared experts (``shared_module``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["OUTER_TO_HF", "mlp_to_hf", "mlp_to_megatron", "outer_to_hf", "outer_to_megatron"]


def mlp_to_megatron(sd: Mapping[str, Tensor], h: str, m: str, num_experts: int,
                    experts: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Megatron weights of the MLP of HF layer prefix ``h`` under Megatron prefix ``m``
    (``experts``: only those routed experts, by global index; all by default)."""
    if h + "mlp.gate.weight" not in sd:  # dense layer
        return {m + "mlp.linear_fc1.weight": torch.cat(
                    [sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]], 0),
                m + "mlp.linear_fc2.weight": sd[h + "mlp.down_proj.weight"]}
    out = {m + "mlp.router.weight": sd[h + "mlp.gate.weight"]}
    if h + "mlp.gate.e_score_correction_bias" in sd:
        out[m + "mlp.router.expert_bias"] = sd[h + "mlp.gate.e_score_correction_bias"]
    fused = h + "mlp.experts.gate_up_proj" in sd
    if fused:  # read once (a lazy mapping reads a tensor from disk at each access)
        gate_up, down = sd[h + "mlp.experts.gate_up_proj"], sd[h + "mlp.experts.down_proj"]
    for e in range(num_experts) if experts is None else experts:
        x = f"{m}mlp.experts.local_experts.{e}."
        if fused:
            out[x + "linear_fc1.weight"] = gate_up[e]
            out[x + "linear_fc2.weight"] = down[e]
        else:
            p = f"{h}mlp.experts.{e}."
            out[x + "linear_fc1.weight"] = torch.cat(
                [sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"]], 0)
            out[x + "linear_fc2.weight"] = sd[p + "down_proj.weight"]
    s = h + "mlp.shared_experts."
    if s + "gate_proj.weight" in sd and sd[s + "gate_proj.weight"].numel():
        out[m + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
            [sd[s + "gate_proj.weight"], sd[s + "up_proj.weight"]], 0)
        out[m + "mlp.shared_experts.linear_fc2.weight"] = sd[s + "down_proj.weight"]
    return out


def mlp_to_hf(full: Mapping[str, Tensor], h: str, m: str, num_experts: int, *,
              shared_module: bool = False) -> dict[str, Tensor]:
    """HF weights of the MLP of Megatron layer prefix ``m`` under HF layer prefix ``h``
    (``shared_module``: the HF MoE block has a shared-expert MLP even without shared experts,
    zero wide)."""
    if m + "mlp.router.weight" not in full:  # dense layer
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, 0)
        return {h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": full[m + "mlp.linear_fc2.weight"]}
    x = f"{m}mlp.experts.local_experts."
    experts = range(num_experts)
    out = {h + "mlp.gate.weight": full[m + "mlp.router.weight"],
           h + "mlp.experts.gate_up_proj": torch.stack(
               [full[f"{x}{e}.linear_fc1.weight"] for e in experts]),
           h + "mlp.experts.down_proj": torch.stack(
               [full[f"{x}{e}.linear_fc2.weight"] for e in experts])}
    if m + "mlp.router.expert_bias" in full:
        out[h + "mlp.gate.e_score_correction_bias"] = full[m + "mlp.router.expert_bias"]
    s = h + "mlp.shared_experts."
    if m + "mlp.shared_experts.linear_fc1.weight" in full:
        gate, up = full[m + "mlp.shared_experts.linear_fc1.weight"].chunk(2, 0)
        out[s + "gate_proj.weight"], out[s + "up_proj.weight"] = gate, up
        out[s + "down_proj.weight"] = full[m + "mlp.shared_experts.linear_fc2.weight"]
    elif shared_module:  # HF builds a zero-width shared MLP
        ref = full[m + "mlp.router.weight"]
        hidden = ref.shape[1]
        out[s + "gate_proj.weight"] = ref.new_zeros(0, hidden)
        out[s + "up_proj.weight"] = ref.new_zeros(0, hidden)
        out[s + "down_proj.weight"] = ref.new_zeros(hidden, 0)
    return out


# The weights outside the decoder layers: embedding, final norm and (untied) output layer.
_OUTER = (("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
          ("model.norm.weight", "decoder.final_layernorm.weight"),
          ("lm_head.weight", "output_layer.weight"))
OUTER_TO_HF = {ours: hf for hf, ours in _OUTER}


def outer_to_megatron(sd: Mapping[str, Tensor], tied: bool) -> dict[str, Tensor]:
    """The HF embedding, final norm and lm_head (absent when ``tied``) by GPTModel name."""
    return {ours: sd[hf] for hf, ours in _OUTER if not (tied and hf == "lm_head.weight")}


def outer_to_hf(full: Mapping[str, Tensor], tied: bool) -> dict[str, Tensor]:
    """Inverse of :func:`outer_to_megatron`."""
    return {hf: full[ours] for hf, ours in _OUTER if not (tied and hf == "lm_head.weight")}

"""One decoder layer's MLP from Megatron's names to HF's (both families share it): the gated
dense MLP of a leading dense layer, or the router and the routed experts in transformers 5's
fused layout (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I])."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["mlp_to_hf"]


def mlp_to_hf(full: Mapping[str, Tensor], h: str, m: str, num_experts: int) -> dict[str, Tensor]:
    """HF weights of the MLP of Megatron layer prefix ``m`` under HF layer prefix ``h``."""
    if m + "mlp.router.weight" not in full:  # dense layer
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, 0)
        return {h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": full[m + "mlp.linear_fc2.weight"]}
    x = f"{m}mlp.experts.local_experts."
    experts = range(num_experts)
    return {h + "mlp.gate.weight": full[m + "mlp.router.weight"],
            h + "mlp.experts.gate_up_proj": torch.stack(
                [full[f"{x}{e}.linear_fc1.weight"] for e in experts]),
            h + "mlp.experts.down_proj": torch.stack(
                [full[f"{x}{e}.linear_fc2.weight"] for e in experts])}

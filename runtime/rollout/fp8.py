"""FP8 weight emulation of the embedded rollout engine (``rollout.fp8``).

With ``rollout.fp8: true`` vLLM serves with ``--quantization fp8``: it rounds the weights of
its linear layers to ``float8_e4m3fn`` and multiplies by a scale. The embedded engine
emulates that rounding on its own (fp32 or bf16) weights, at load and after every weight
update, so its samples and log-probs carry the same kind of train–inference mismatch the
FP8 rollouts of a cluster run do. Each quantized weight W (2-D [out, in], or 3-D
[experts, out, in] for fused experts) becomes, per output channel c (per expert)::

    s_c   = max_j |W_cj| / 448                 (448: the largest finite e4m3fn value;
                                                s_c = 1 for an all-zero channel)
    Ŵ_cj  = fp8_e4m3fn(clamp(W_cj / s_c, ±448)) · s_c

``fp8_e4m3fn`` rounds to the nearest of its values (3 mantissa bits, round-half-to-even;
normal range from 2⁻⁶, subnormal steps of 2⁻⁹), so per element
``|W − Ŵ| ≤ 2⁻⁴·|W| + 2⁻¹⁰·s_c``, and the channel's largest entry is exact (±448·s_c).
Rounding is idempotent: Ŵ quantizes to itself. The weights stay in the engine's dtype;
activations and the KV cache are not rounded (vLLM's W8A8 path also quantizes activations
dynamically; that part is not emulated). vLLM's online quantization of a bf16 checkpoint
scales per tensor (per expert for MoE weights): per output channel is the finer grid, the
one FP8 RL recipes use for weights, so the emulated mismatch is not larger than vLLM's.

Which weights: what vLLM's ``Fp8LinearMethod`` / ``Fp8MoEMethod`` quantize, i.e. every
``nn.Linear`` weight of the decoder (attention projections, including MLA's low-rank ones,
dense and shared-expert MLPs) and the fused expert weights (the 3-D parameters of an
``*Experts`` module). Left as they are, as vLLM leaves them: the embeddings and the output
layer (``lm_head``, tied or not), norms, biases, and the MoE routers (vLLM builds the router
``gate`` with ``quant_config=None``; in transformers it is a ``*Router`` module, with the
selection bias ``e_score_correction_bias`` beside it).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["E4M3_MAX", "fp8_parameter_names", "quantize_fp8_", "round_fp8"]

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0


def round_fp8(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded through float8_e4m3fn with one absmax scale per output channel
    (the second-to-last dimension: rows of a [out, in] weight, per expert of [E, out, in]);
    same shape and dtype (formula in the module docstring)."""
    if weight.dim() < 2:
        raise ValueError(f"an FP8 weight has an output and an input dimension, got shape "
                         f"{tuple(weight.shape)}")
    w = weight.detach().float()
    absmax = w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / E4M3_MAX, torch.ones_like(absmax))
    q = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(weight.dtype)


def _is_router(name: str, module: nn.Module) -> bool:
    return "router" in type(module).__name__.lower() or name.split(".")[-1] == "gate"


def fp8_parameter_names(model: nn.Module) -> list[str]:
    """The names (``model.named_parameters()``) of the weights FP8 serving quantizes, in
    order (selection in the module docstring)."""
    skip: set[int] = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(model, get, lambda: None)()
        if emb is not None and getattr(emb, "weight", None) is not None:
            skip.add(id(emb.weight))
    chosen: set[int] = set()
    for name, module in model.named_modules():
        if _is_router(name, module):
            continue
        if isinstance(module, nn.Linear):
            chosen.add(id(module.weight))
        elif type(module).__name__.endswith("Experts"):
            chosen.update(id(p) for p in module.parameters(recurse=False) if p.dim() == 3)
    names, seen = [], set()
    for name, p in model.named_parameters():
        if id(p) in chosen and id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            names.append(name)
    return names


@torch.no_grad()
def quantize_fp8_(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Round ``model``'s FP8 weights (``names``, default :func:`fp8_parameter_names`) in
    place; returns the names rounded."""
    names = fp8_parameter_names(model) if names is None else names
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        p.copy_(round_fp8(p))
    return names

"""Train–inference correction, TIS / MIS (``train_inference_correction``; composable with
any loss)::

    ω_t = π_train_old(t) / μ_rollout(t) = exp(old_logp_t − rollout_logp_t)
    tis:  token_weight_t = sg(min(ω_t, cap))     (mask unchanged)
    mis:  mask'_t = mask_t · [low ≤ ω_t ≤ high]  (token_weight = 1 on kept tokens)
    none: mask and token_weight = 1 unchanged

Pass the returned ``mask`` and ``token_weight`` to the loss. With MIS the removed tokens
leave every denominator *and* (for GSPO/ESPO) the sequence/group ratios and the ESPO
entropy grouping, since those are all defined over the mask.

Metrics (``correction/`` prefix):
  ``correction/n_tokens``        valid tokens before the correction
  ``correction/frac_masked``     fraction of valid tokens removed (MIS; 0 otherwise)
  ``correction/mean_weight``     mean of the returned token_weight over kept tokens
  ``correction/frac_capped``     fraction of valid tokens with ω_t > cap (TIS; 0 otherwise)
  ``correction/mean_raw_weight`` mean of ω_t over valid tokens (before cap / mask)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from runtime.losses.base import CorrectionOutput, _check, _compute_dtype, _masked, _ratio


def train_inference_correction(
    old_logp: Tensor,
    rollout_logp: Tensor | None,
    mask: Tensor,
    *,
    mode: Literal["none", "tis", "mis"] = "none",
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> CorrectionOutput:
    """Train–inference mismatch correction, composable with any loss.

    ``ω_t = π_train_old(t) / μ_rollout(t) = exp(old_logp_t − rollout_logp_t)``.

    * ``tis``: ``token_weight_t = sg(min(ω_t, cap))``; the mask is unchanged. The loss then
      multiplies each token's objective term by it (``o_t → token_weight_t·o_t``).
    * ``mis``: tokens with ``ω_t`` outside ``[low, high]`` are removed from the returned
      mask (so from every denominator); ``token_weight`` is 1 on the kept tokens.
    * ``none``: mask unchanged, ``token_weight`` 1 on valid tokens.

    ``token_weight`` is detached and 0 on padding. ``rollout_logp`` may be None only for
    ``mode='none'``.
    """
    if mode not in ("none", "tis", "mis"):
        raise ValueError(f"mode must be 'none', 'tis' or 'mis', got {mode!r}")
    cap = _check("cap", cap, low_inclusive=False)
    low = _check("low", low)
    high = _check("high", high)
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    if old_logp.shape != mask.shape:
        raise ValueError(
            f"old_logp has shape {tuple(old_logp.shape)}, mask has {tuple(mask.shape)}"
        )
    if mode != "none" and rollout_logp is None:
        raise ValueError(f"mode {mode!r} needs rollout_logp")
    if rollout_logp is not None and rollout_logp.shape != mask.shape:
        raise ValueError(
            f"rollout_logp has shape {tuple(rollout_logp.shape)}, expected {tuple(mask.shape)}"
        )
    dtype = _compute_dtype(old_logp)
    with torch.no_grad():
        m = mask if mask.dtype == torch.bool else mask != 0
        mf = m.to(dtype)
        n = mf.sum()
        if rollout_logp is None:
            omega = mf.clone()
        else:
            log_w = _masked(old_logp.detach().to(dtype) - rollout_logp.detach().to(dtype), mf)
            omega = _ratio(log_w) * mf  # 0 on padding
        kept, weight = m, mf
        frac_capped = torch.zeros((), dtype=dtype, device=mf.device)
        if mode == "tis":
            weight = omega.clamp(max=cap)
            frac_capped = (omega > cap).sum() / n.clamp(min=1)
        elif mode == "mis":
            kept = m & (omega >= low) & (omega <= high)
            weight = kept.to(dtype)
        n_kept = kept.sum()
        metrics = {
            "correction/n_tokens": n,
            "correction/frac_masked": (n - n_kept) / n.clamp(min=1),
            "correction/mean_weight": (weight * kept).sum() / n_kept.clamp(min=1),
            "correction/frac_capped": frac_capped,
            "correction/mean_raw_weight": omega.sum() / n.clamp(min=1),
        }
        floats = torch.stack([v.to(dtype).reshape(()) for v in metrics.values()]).tolist()
    return CorrectionOutput(
        mask=kept if mask.dtype == torch.bool else kept.to(mask.dtype),
        token_weight=weight.clone() if weight is mf else weight,
        metrics=dict(zip(metrics, floats, strict=True)),
    )

"""GRPO / DAPO token-level clipped loss (``grpo_loss``; clip_low=0.2, clip_high=0.28)::

    r = exp(logp − old_logp)
    o = min(r·A, clip(r, 1 − clip_low, 1 + clip_high)·A)
    objective = Σ_{b,t} m·w·o / Σ_{b,t} m                     (token mean over the batch)

``w_t`` = ``token_weight`` or 1, ``m`` = mask (notation: ``runtime/losses/__init__.py``).
The gradient is attached in closed form (``_WithGrad``, as for GSPO, ESPO and CISPO)::

    ∂loss/∂logp_t = −m·w·r·A·1[r·A ≤ clip(r)·A] / Σ m

(the unclipped term is the minimum exactly when the clip does not bind; at a tie both
terms have the same derivative). A token whose log ratio exceeds ``MAX_LOG_RATIO`` gets
the ratio ``exp(MAX_LOG_RATIO)`` and a zero gradient (like a dual clip).
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.losses.base import (
    MAX_LOG_RATIO,
    LossOutput,
    _check,
    _finish,
    _prepare,
    _ratio,
    _token_metrics,
    _WithGrad,
)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    token_weight: Tensor | None = None,
) -> LossOutput:
    """GRPO / DAPO token-level clipped loss.

    ``r = exp(logp − old_logp)``;
    ``o = min(r·A, clip(r, 1 − clip_low, 1 + clip_high)·A)``;
    ``objective = Σ_{b,t} mask·w·o / Σ_{b,t} mask`` (token mean over the whole batch,
    ``w`` = token_weight or 1); ``loss = −objective``; gradient in closed form (module doc).
    """
    clip_low = _check("clip_low", clip_low)
    clip_high = _check("clip_high", clip_high)
    b = _prepare(logp, old_logp, advantages, mask, token_weight, track_grad=False)
    with torch.no_grad():
        r = _ratio(b.log_r)
        unclipped = r * b.adv
        clipped = r.clamp(1.0 - clip_low, 1.0 + clip_high) * b.adv
        weight = (b.mf if b.tw is None else b.tw) / -b.n.clamp(min=1)
        value = (torch.minimum(unclipped, clipped) * weight).sum()
        live = (unclipped <= clipped) & (b.log_r <= MAX_LOG_RATIO)
        grad = unclipped * weight * live
        metrics = _token_metrics(b, r, clipped < unclipped)
    return _finish(_WithGrad.apply(logp, value, grad), metrics)

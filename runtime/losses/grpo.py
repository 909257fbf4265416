"""GRPO / DAPO token-level clipped loss (``grpo_loss``; clip_low=0.2, clip_high=0.28)::

    r = exp(logp − old_logp)
    o = min(r·A, clip(r, 1 − clip_low, 1 + clip_high)·A)
    objective = Σ_{b,t} m·w·o / Σ_{b,t} m                     (token mean over the batch)

``w_t`` = ``token_weight`` or 1, ``m`` = mask (notation: ``runtime/losses/__init__.py``).
Plain autograd through the formula. A token whose log ratio exceeds ``MAX_LOG_RATIO`` gets
the ratio ``exp(MAX_LOG_RATIO)`` and a zero gradient (like a dual clip).
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.losses.base import LossOutput, _check, _finish, _prepare, _ratio, _token_metrics


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
    ``w`` = token_weight or 1); ``loss = −objective``. Plain autograd through the formula.
    """
    clip_low = _check("clip_low", clip_low)
    clip_high = _check("clip_high", clip_high)
    b = _prepare(logp, old_logp, advantages, mask, token_weight, track_grad=True)
    r = _ratio(b.log_r)
    unclipped = r * b.adv
    clipped = r.clamp(1.0 - clip_low, 1.0 + clip_high) * b.adv
    o = torch.minimum(unclipped, clipped)
    o = o * (b.mf if b.tw is None else b.tw)
    loss = -o.sum() / b.n.clamp(min=1)
    with torch.no_grad():
        metrics = _token_metrics(b, r, clipped < unclipped)
    return _finish(loss, metrics)

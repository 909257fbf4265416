"""CISPO: a clipped, stop-gradient IS weight on a REINFORCE term (``cispo_loss``;
eps_high=0.28, eps_low=inf)::

    r = exp(logp − old_logp);  ŵ = sg(clip(r, 1 − eps_low, 1 + eps_high))
    objective = Σ m·w·ŵ·A·logp / Σ m

``w_t`` = ``token_weight`` or 1, ``m`` = mask (notation: ``runtime/losses/__init__.py``).
``eps_low=None`` (the spec's "unbounded below") is the same as ``inf``. Linear in logp: the
gradient ``−m·w·ŵ·A / Σ m`` is attached to ``logp`` by ``_WithGrad``. ``clip_frac`` is the
fraction of valid tokens whose IS weight is clipped.

Metric added:
  ``is_weight/mean``  mean over valid tokens of the clipped IS weight ŵ
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from runtime.losses.base import (
    LossOutput,
    _check,
    _finish,
    _masked,
    _prepare,
    _ratio,
    _token_metrics,
    _WithGrad,
)


def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_high: float = 0.28,
    eps_low: float | None = math.inf,
    token_weight: Tensor | None = None,
) -> LossOutput:
    """CISPO: a clipped, stop-gradient IS weight on a REINFORCE term.

    ``r = exp(logp − old_logp)``; ``ŵ = sg(clip(r, 1 − eps_low, 1 + eps_high))``;
    ``objective = Σ mask·w·ŵ·A·logp / Σ mask``; ``loss = −objective``.
    ``eps_low=None`` or ``inf``: no lower bound. (Linear in logp: the gradient is
    ``−mask·w·ŵ·A / Σ mask``.)
    """
    eps_high = _check("eps_high", eps_high)
    eps_low = math.inf if eps_low is None else _check("eps_low", eps_low)
    b = _prepare(logp, old_logp, advantages, mask, token_weight, track_grad=False)
    with torch.no_grad():
        r = _ratio(b.log_r)
        lo, hi = 1.0 - eps_low, 1.0 + eps_high
        w = r.clamp(min=lo, max=hi)
        grad = w * b.adv * (b.mf if b.tw is None else b.tw) / -b.n.clamp(min=1)
        value = (grad * _masked(logp.detach().to(r.dtype), b.mf)).sum()
        metrics = _token_metrics(b, r, (r > hi) | (r < lo))
        metrics["is_weight/mean"] = (w * b.mf).sum() / b.n.clamp(min=1)
    return _finish(_WithGrad.apply(logp, value, grad), metrics)

"""GSPO-token loss (``gspo_loss``; clip_low=3e-4, clip_high=4e-4), and the grouped PPO core
shared with ESPO::

    log s_b   = Σ_t m·(logp − old_logp) / Σ_t m
    s_{b,t}   = exp(sg(log s_b) + logp_{b,t} − sg(logp_{b,t}))  (value s_b, gradient per token)
    o         = min(s·A, clip(s, 1 − clip_low, 1 + clip_high)·A)
    objective = mean over b of (Σ_t m·w·o / Σ_t m)

``w_t`` = ``token_weight`` or 1, ``m`` = mask (notation: ``runtime/losses/__init__.py``).
Responses with no valid token are left out of the mean over b.

Computed per group (GSPO: one group per response; ESPO: low and high): since
``s_{τ,t} = exp(sg(log s_τ) + logp_t − sg(logp_t))`` has value ``s_τ`` and
``∂s_{τ,t}/∂logp_t = s_τ``, the gradient is ``∂loss/∂logp_t = −c_t·w_t·s_τ·A_t·1[t not
clipped]`` (``c_t`` the token's averaging weight), computed directly and attached to
``logp`` by ``_WithGrad`` (``_grouped_ppo_loss``). The group ratio is
``exp(min(log s_τ, MAX_LOG_RATIO))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from runtime.losses.base import (
    LossOutput,
    _as_float,
    _Batch,
    _check,
    _finish,
    _prepare,
    _ratio,
    _WithGrad,
)


def _closed_ppo(
    ratio: Tensor, adv: Tensor, lo: float | Tensor, hi: float | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``o = min(ratio·A, clip(ratio, lo, hi)·A)`` in closed form, with ``∂o/∂ratio``.

    For A ≥ 0, ``o = A·min(ratio, hi)``; for A < 0, ``o = A·max(ratio, lo)``. The clipped
    branch is active (strictly smaller) when A > 0 and ratio > hi, or A < 0 and ratio < lo;
    there ``∂o/∂ratio = 0``, elsewhere ``A`` -- what autograd of the min/clip gives.
    """
    pos = adv >= 0
    o = adv * torch.where(pos, ratio.clamp(max=hi), ratio.clamp(min=lo))
    clipped = torch.where(pos, ratio > hi, ratio < lo) & (adv != 0)
    return o, clipped, torch.where(clipped, 0.0, adv)


def _expand(groups: tuple[Tensor, ...], x: Tensor) -> Tensor:
    """Per-group values ``x`` [B, G] → per token (0 on padding); ``groups`` are 0/1 masks."""
    out = groups[0] * x[:, 0:1]
    for g in range(1, len(groups)):
        out = torch.addcmul(out, groups[g], x[:, g : g + 1])
    return out


def _grouped_ppo_loss(
    b: _Batch,
    logp: Tensor,
    groups: tuple[Tensor, ...],
    log_s: Tensor,
    lo: float | Tensor,
    hi: float | Tensor,
    coef: Tensor,
    cnt: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss of GSPO-token / ESPO from per-group constants, with the exact gradient.

    ``groups``: G float 0/1 masks [B, T] that partition the valid tokens (GSPO: the mask;
    ESPO: low, high). ``log_s`` [B, G] is sg(log s_τ); ``lo``/``hi`` the clip bounds (floats
    or [B, G]); ``coef`` [B, G] the averaging weight ``c_τ`` of a token of group τ (the
    nested means as one weighted sum); ``cnt`` [B, G] the group sizes.
    Returns the loss ``−Σ_t c_τ·w_t·o_t``, the per-group count of clipped tokens and s_τ.

    ``s_{τ,t} = exp(sg(log s_τ) + logp_t − sg(logp_t))`` has value ``s_τ`` and
    ``∂s_{τ,t}/∂logp_t = s_τ``, so ``∂loss/∂logp_t = −c_τ·w_t·s_τ·∂o_t/∂s``: the loss is
    built from that value and that gradient (``_WithGrad``) instead of a [B, T] autograd
    graph of exp/clip/min -- the same numbers, several times cheaper.
    """
    with torch.no_grad():
        s = _ratio(log_s)
        if b.adv.shape[1] == 1:  # sequence advantages: o is constant inside a group
            o, clipped, d = _closed_ppo(s, b.adv, lo, hi)
            if b.tw is None:
                value = -(coef * o * cnt).sum()
                grad = _expand(groups, -coef * d * s)
            else:
                value = -(_expand(groups, coef * o) * b.tw).sum()
                grad = _expand(groups, -coef * d * s) * b.tw
            n_clipped = clipped * cnt
        else:  # token advantages
            s_t = _expand(groups, s)
            lo_t = lo if isinstance(lo, float) else _expand(groups, lo)
            hi_t = hi if isinstance(hi, float) else _expand(groups, hi)
            o, clipped, d = _closed_ppo(s_t, b.adv, lo_t, hi_t)
            c_t = _expand(groups, coef)
            if b.tw is not None:
                c_t = c_t * b.tw
            value = -(c_t * o).sum()
            grad = -c_t * d * s_t
            cf = _as_float(clipped).to(s.dtype)
            n_clipped = torch.stack([(cf * g).sum(1) for g in groups], 1)
    return _WithGrad.apply(logp, value, grad), n_clipped.to(s.dtype), s


def _group_metrics(
    b: _Batch, s: Tensor, cnt: Tensor, n_clipped: Tensor, log_r_sum: Tensor
) -> dict[str, Tensor]:
    nonempty = cnt > 0
    nc = b.n.clamp(min=1)
    if s.numel():
        r_min = torch.where(nonempty, s, math.inf).amin().where(b.n > 0, 0.0)
        r_max = torch.where(nonempty, s, -math.inf).amax().where(b.n > 0, 0.0)
    else:
        r_min = r_max = b.n * 0
    return {
        "n_tokens": b.n,
        "n_responses": b.n_resp,
        "ratio/mean": (s * cnt).sum() / nc,
        "ratio/min": r_min,
        "ratio/max": r_max,
        "approx_kl": -log_r_sum / nc,
        "clip_frac": n_clipped.sum() / nc,
    }


def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    token_weight: Tensor | None = None,
) -> LossOutput:
    """GSPO-token loss: a sequence-level ratio with a per-token gradient.

    ``log s_b = Σ_t mask·(logp − old_logp) / Σ_t mask``;
    ``s_{b,t} = exp(sg(log s_b) + logp_{b,t} − sg(logp_{b,t}))`` (value s_b, gradient per
    token); ``o = min(s·A, clip(s, 1 − clip_low, 1 + clip_high)·A)``;
    ``objective = mean over b of (Σ_t mask·w·o / Σ_t mask)``; ``loss = −objective``.
    Responses with no valid token are left out of the mean over b.
    """
    clip_low = _check("clip_low", clip_low)
    clip_high = _check("clip_high", clip_high)
    b = _prepare(logp, old_logp, advantages, mask, token_weight, track_grad=False)
    with torch.no_grad():
        cnt = b.L[:, None]  # [B, 1]: one group per response
        lr_sum = b.log_r.sum(1, keepdim=True)
        log_s = lr_sum / cnt.clamp(min=1)
        coef = (cnt > 0) / (cnt.clamp(min=1) * b.n_resp.clamp(min=1))
    loss, n_clipped, s = _grouped_ppo_loss(
        b, logp, (b.mf,), log_s, 1.0 - clip_low, 1.0 + clip_high, coef, cnt
    )
    with torch.no_grad():
        metrics = _group_metrics(b, s, cnt, n_clipped, lr_sum.sum())
    return _finish(loss, metrics)

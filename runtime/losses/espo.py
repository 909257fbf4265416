"""ESPO: entropy-grouped sequence ratios with entropy-scaled clip ranges (``espo_loss``;
alpha=0.02, high_entropy_fraction ρ=0.2, vocab_size V)::

    L_b = Σ_t m;  k_b = ceil(ρ·L_b)
    high group of b = the k_b valid tokens of highest entropy (ties: earlier position first),
    low group       = the other L_b − k_b valid tokens; an empty group is dropped
                      (ρ = 1 means one group)
    for each group τ of b:
        log s_τ   = mean_{t∈τ}(logp − old_logp)
        s_{τ,t}   = exp(sg(log s_τ) + logp_t − sg(logp_t))
        ε_τ       = alpha · mean_{t∈τ}(entropy_t) / ln V
        o_t       = min(s_{τ,t}·A, clip(s_{τ,t}, 1 − ε_τ, 1 + ε_τ)·A)
    objective_b = mean over the non-empty groups τ of (mean_{t∈τ} w_t·o_t)
    objective   = mean over b of objective_b

``w_t`` = ``token_weight`` or 1, ``m`` = mask, ``entropy[b,t]`` the old policy's token
entropy (natural log, full vocabulary; notation: ``runtime/losses/__init__.py``).

Decisions:

* The grouping is a vectorised top-k per response without a sort (one integer ``topk``
  over all rows, then the tie rule); see ``_high_group``. It reads K = max_b k_b, the sign
  of min(entropy) and whether any row has surplus ties back to the host.
* ``k_b = ceil(ρ·L_b)`` is evaluated in float64 with a 1e-9 tolerance against rounding
  (``ρ = 0.07, L_b = 100``: 7.000000000000001 gives 7, not 8), and is at least 1 when
  L_b ≥ 1.
* ESPO needs entropy ≥ 0 (ε_τ ≥ 0); the grouping itself orders any finite values.
* The loss and its gradient come from the grouped PPO core of ``runtime.losses.gspo``.

Metrics added, per entropy group g ∈ {high, low}:
  ``clip_frac/high``, ``clip_frac/low``   clip fraction among the group's valid tokens
  ``eps/high``, ``eps/low``               mean over responses (that have a non-empty group
                                          g) of ε_g
  ``n_tokens/high``, ``n_tokens/low``     tokens in the group (over the batch)
  ``entropy/high``, ``entropy/low``       mean entropy over the group's tokens
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from runtime.losses.base import LossOutput, _as_float, _check, _finish, _prepare
from runtime.losses.gspo import _group_metrics, _grouped_ppo_loss

#: Tolerance of ``k_b = ceil(ρ·L_b)`` against float rounding.
_K_TOL = 1e-9


def _order_key(bits: Tensor, out: Tensor) -> Tensor:
    """Write into ``out`` integers ordered as the floats whose IEEE bits are ``bits``.

    The bits read as a signed integer are ordered for x ≥ 0; for x < 0 the magnitude bits
    are flipped so that the order reverses there. The map is its own inverse. (−0.0 and NaN
    must not occur.)
    """
    shift, ones = 8 * bits.element_size() - 1, torch.iinfo(bits.dtype).max
    return torch.bitwise_xor(bits, (bits >> shift) & ones, out=out)


def _high_group(
    entropy: Tensor, mf: Tensor, L: Tensor, rho: float
) -> tuple[Tensor, Tensor, Tensor]:
    """ESPO grouping: (high-group 0/1 mask [B, T], its size [B], entropy with padding −max).

    Vectorised, O(T) per row, no sort. With ``H`` the entropy (−max on padding) and
    ``key`` its bits as order-preserving integers:

    1. θ_b, the k_b-th largest key of row b, is the K-th largest (K = max_b k_b) of
       ``[key_b | K − k_b highest integers, k_b lowest integers]``: one ``topk`` over all
       rows (an integer topk is cheaper than a sort, a kthvalue or a float topk);
    2. high = H ≥ θ_b; only in rows where tokens tied at θ_b overshoot k_b are the tied
       ones taken in position order (a cumulative count) -- the tie rule.

    Entropies must be finite on valid tokens; padding values are ignored. Reads ``K`` and
    whether any row has surplus ties back to the host.
    """
    dtype = mf.dtype
    hdtype = torch.promote_types(entropy.dtype, dtype)  # exact: creates no new ties
    mfh = mf.to(hdtype)
    big = torch.finfo(hdtype).max
    B, T = mf.shape
    k = torch.ceil(L.to(torch.float64) * rho - _K_TOL).clamp(min=1)
    k = torch.minimum(k, L.to(torch.float64)).to(dtype)  # 1 ≤ k_b ≤ L_b, 0 if L_b = 0
    K = 0 if rho == 1.0 or not k.numel() else int(k.max())
    # row = [H | pad] in one buffer, so that the topk needs no concatenation.
    row = torch.empty(B, T + K, dtype=hdtype, device=mf.device)
    H = row[:, :T]
    # valid: the entropy (+ 0.0 turns −0.0 into +0.0); padding: −max, even if NaN or inf.
    torch.addcmul((mfh - 1.0) * big, entropy.detach().to(hdtype), mfh, out=H)
    H.nan_to_num_(nan=-big)
    H_out = H if hdtype == dtype else H.clamp(min=torch.finfo(dtype).min).to(dtype)
    if K == 0:  # ρ = 1 (one group) or no valid token
        return mf.clone(), L.clone(), H_out
    keys = row.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[row.element_size()])
    # Non-negative floats (and padding, all −max) are already ordered as integers.
    signed = not bool(entropy.detach().amin() >= 0)
    if signed:
        H = H.clone()  # keep the floats; the keys overwrite the buffer
        _order_key(keys[:, :T], out=keys[:, :T])
    lowest, highest = torch.iinfo(keys.dtype).min, torch.iinfo(keys.dtype).max
    ranks = torch.arange(K, device=mf.device, dtype=dtype)[None, :]
    keys[:, T:] = torch.where(ranks < (K - k)[:, None], highest, lowest)
    theta = torch.topk(keys, K, dim=1, sorted=False).values.amin(1, keepdim=True)
    if signed:
        theta = _order_key(theta, out=torch.empty_like(theta))
    theta = theta.view(hdtype)  # NaN for rows with k_b = 0: nothing compares ≥ to it
    high = torch.ge(H, theta, out=torch.empty(B, T, dtype=dtype, device=mf.device))
    cnt = high.sum(1)
    excess = cnt > k
    if bool(excess.any()):  # ties at θ_b: keep the earliest positions
        rows = excess.nonzero().flatten()
        hr, th = H[rows], theta[rows]
        above, tie = hr > th, hr == th
        need = k[rows] - above.sum(1)
        first = tie & (tie.cumsum(1) <= need[:, None])
        high[rows] = _as_float(above | first).to(dtype)
        cnt[rows] = k[rows]
    return high, cnt, H_out


def espo_high_entropy_mask(entropy: Tensor, mask: Tensor, high_entropy_fraction: float) -> Tensor:
    """Bool ``[B, T]``: the ESPO high-entropy group of every response.

    For response b with ``L_b`` valid tokens, the ``k_b = ceil(ρ·L_b)`` valid tokens of
    highest entropy (ties: earlier position first); see ``_high_group`` for the algorithm.
    Entropies must be finite on valid tokens.
    """
    rho = _check_rho(high_entropy_fraction)
    if mask.dim() != 2 or entropy.shape != mask.shape:
        raise ValueError(
            f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} must both be [B, T]"
        )
    m = mask if mask.dtype == torch.bool else mask != 0
    with torch.no_grad():
        mf = _as_float(m).to(torch.promote_types(entropy.dtype, torch.float32))
        return _high_group(entropy, mf, mf.sum(1), rho)[0].bool()


def _check_rho(rho: float) -> float:
    rho = _check("high_entropy_fraction", rho, low_inclusive=False)
    if rho > 1.0:
        raise ValueError(f"high_entropy_fraction must be in (0, 1], got {rho}")
    return rho


def espo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    entropy: Tensor,
    *,
    alpha: float = 0.02,
    high_entropy_fraction: float = 0.2,
    vocab_size: int,
    token_weight: Tensor | None = None,
) -> LossOutput:
    """ESPO: entropy-grouped sequence ratios with entropy-scaled clip ranges.

    For each response b with ``L_b`` valid tokens, the ``k_b = ceil(ρ·L_b)`` tokens of
    highest entropy form the high group, the rest the low group (ties: earlier position
    first; an empty group is dropped; ρ = 1 means one group). For each group τ of b::

        log s_τ = mean_{t∈τ}(logp − old_logp)
        s_{τ,t} = exp(sg(log s_τ) + logp_t − sg(logp_t))
        ε_τ     = alpha · mean_{t∈τ}(entropy_t) / ln V
        o_t     = min(s_{τ,t}·A, clip(s_{τ,t}, 1 − ε_τ, 1 + ε_τ)·A)

    ``objective_b`` = mean over the non-empty groups τ of (mean_{t∈τ} w_t·o_t);
    ``objective`` = mean over b (responses with L_b ≥ 1) of objective_b; ``loss = −objective``.
    ``entropy`` is the old policy's (detached, ≥ 0 so that ε_τ ≥ 0), ``V = vocab_size``.

    Implementation: everything but the gradient is per group ([B, 2]); the loss is attached
    to ``logp`` through its exact gradient (see ``_grouped_ppo_loss``).
    """
    alpha = _check("alpha", alpha)
    rho = _check_rho(high_entropy_fraction)
    try:
        vocab_size = operator.index(vocab_size)
    except TypeError:
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}") from None
    if isinstance(vocab_size, bool) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer ≥ 2, got {vocab_size!r}")
    b = _prepare(logp, old_logp, advantages, mask, token_weight, track_grad=False)
    if entropy.shape != b.m.shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)}, expected {tuple(b.m.shape)}")
    with torch.no_grad():
        hf, cnt_h, H = _high_group(entropy, b.mf, b.L, rho)
        lf = b.mf - hf
        groups = (lf, hf)  # column 0: low group, column 1: high group

        def by_group(x: Tensor) -> Tensor:  # [B, T] → [B, 2] sums over each group
            return torch.stack([(x * lf).sum(1), (x * hf).sum(1)], 1)

        cnt = torch.stack([b.L - cnt_h, cnt_h], 1)
        cnt_c = cnt.clamp(min=1)
        lr_sum = by_group(b.log_r)
        log_s = lr_sum / cnt_c
        H_sum = by_group(H)
        eps = (alpha / math.log(vocab_size)) * H_sum / cnt_c
        nonempty = cnt > 0
        n_groups = nonempty.sum(1, keepdim=True).clamp(min=1)
        coef = nonempty / (cnt_c * n_groups * b.n_resp.clamp(min=1))
    loss, n_clipped, s = _grouped_ppo_loss(b, logp, groups, log_s, 1.0 - eps, 1.0 + eps, coef, cnt)
    with torch.no_grad():
        metrics = _group_metrics(b, s, cnt, n_clipped, lr_sum.sum())
        tok_g, clip_g, ne_g = cnt.sum(0), n_clipped.sum(0), nonempty.sum(0)
        for j, name in ((1, "high"), (0, "low")):
            metrics[f"clip_frac/{name}"] = clip_g[j] / tok_g[j].clamp(min=1)
            metrics[f"eps/{name}"] = (eps[:, j] * nonempty[:, j]).sum() / ne_g[j].clamp(min=1)
            metrics[f"n_tokens/{name}"] = tok_g[j]
            metrics[f"entropy/{name}"] = H_sum[:, j].sum() / tok_g[j].clamp(min=1)
    return _finish(loss, metrics)

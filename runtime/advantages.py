r"""Group advantages and RL-ZVP token advantages (DESIGN.md §4).

Shapes: ``P`` prompts (groups), ``G`` responses per group, ``T`` padded tokens.
Rewards are ``[P, G]``; ragged groups (adaptive group sizes) are padded to the largest
group and described by ``valid[p, g]`` (True on real responses).

Group advantage (``group_advantages``)::

    A_{p,g} = (R_{p,g} − mean_g R_p) / (std_g R_p + eps)      std = population std
    A_{p,g} = 0                        if group p has zero variance

RL-ZVP for zero-variance groups (``rl_zvp_token_advantages``; alpha_zvp = 0.1,
``H`` = the old policy's token entropy, detached, ``m`` = the token mask)::

    all rewards of p == reward_max:  A_t = +alpha_zvp · H_t
    all rewards of p == reward_min:  A_t = −alpha_zvp · (max_{t' : m_t' = 1} H_t' − H_t)
    group p has variance:            A_t = A_{p,g}            (the group advantage)
    every token with m_t = 0:        A_t = 0

Share of the advantage mass from RL-ZVP groups (``advantage_mass_share``, a per-step
diagnostic; ``reshaped`` = rows of groups whose flat_sign ≠ 0)::

    share = Σ_{b ∈ reshaped, t} |A_{b,t}| m_{b,t}  /  Σ_{b, t} |A_{b,t}| m_{b,t}     (0 if 0/0)

It says how much of the update's signal the reshaped groups carry; it is the advantage
weight of their tokens, not their share of the gradient norm (which also depends on the
log-prob gradients and the clipping).

Decisions (where DESIGN.md is silent)
-------------------------------------

* **Zero variance.** A group is flat when ``max_g R − min_g R ≤ FLAT_TOL · max(1, max_g |R|)``
  (``FLAT_TOL = 1e-9``) over its valid responses. The test is on the range, not on the
  computed std, so exactly equal rewards are always flat whatever the rounding of the
  mean; rewards that differ only by float noise of arithmetic (``0.1 + 0.2`` vs ``0.3``)
  count as equal. Groups that differ by more get the z-score, whose ``eps`` keeps tiny
  differences tiny. A group with fewer than two valid responses is flat.
  ``runtime.filters`` uses the same rule and constant (numpy, no torch).
* **Equality with reward_max / reward_min** uses the same relative tolerance.
* **Flat groups strictly between reward_min and reward_max** (partial credit, or the
  all-tie groups of a pairwise judge whose rewards are all 0) get A = 0 on every token.
* ``flat_sign`` (optional ``[P]`` ints in {−1, 0, +1}) overrides the reward comparison
  for flat groups: +1 → the positive branch, −1 → the negative branch, 0 → A = 0. The ZVE
  pipeline's ``Batch.padded()`` provides it (it knows from verifier scores whether a
  flat group is all-correct even when rewards are pairwise or were shaped, and it sets 0
  for flat groups the spec keeps without reshaping). Without ``flat_sign`` both
  ``reward_max`` and ``reward_min`` are required.
* **Layout.** ``rl_zvp_token_advantages`` accepts entropy / mask either as ``[P, G, T]``
  or flattened ``[P·G, T]`` (row ``b = p·G + g``) and returns the same layout as the
  entropy it was given.
* The max entropy of the negative branch is over the response's valid tokens; a
  response with no valid token gets zeros. Entropy padding values are never read
  (they may be NaN or ``inf``).
* Outputs are detached (advantages are constants of the loss). Integer / bool /
  half-precision inputs are promoted to float32; float64 stays float64.
* Fully vectorised: no Python loop over P, G or T.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FLAT_TOL",
    "advantage_mass_share",
    "group_advantages",
    "rl_zvp_token_advantages",
    "zero_variance_groups",
]

#: Relative tolerance of the zero-variance test (and of equality with reward_max/min).
FLAT_TOL = 1e-9


def _as_float(x: Tensor) -> Tensor:
    x = x.detach()
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def _valid_mask(rewards: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.ones_like(rewards, dtype=torch.bool)
    if valid.shape != rewards.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must match rewards {tuple(rewards.shape)}")
    return valid.to(torch.bool)


def _check_rewards(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")


def zero_variance_groups(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[P]`` bool: True where the group's valid rewards are all equal (see module doc)."""
    _check_rewards(rewards)
    r = _as_float(rewards)
    v = _valid_mask(r, valid)
    hi = torch.where(v, r, torch.full_like(r, -torch.inf)).amax(dim=1)
    lo = torch.where(v, r, torch.full_like(r, torch.inf)).amin(dim=1)
    count = v.sum(dim=1)
    scale = torch.where(v, r.abs(), torch.zeros_like(r)).amax(dim=1).clamp_min(1.0)
    return (count < 2) | ((hi - lo) <= FLAT_TOL * scale)


def group_advantages(rewards: Tensor, eps: float = 1e-6, valid: Tensor | None = None) -> Tensor:
    """Group-normalised advantages ``[P, G]``: ``(R − mean_g R)/(std_g R + eps)``, 0 if flat.

    ``std`` is the population std over the group's valid responses; padding
    (``valid == False``) gets 0.
    """
    _check_rewards(rewards)
    r = _as_float(rewards)
    v = _valid_mask(r, valid)
    vf = v.to(r.dtype)
    count = vf.sum(dim=1, keepdim=True).clamp_min(1.0)
    rv = torch.where(v, r, torch.zeros_like(r))
    mean = rv.sum(dim=1, keepdim=True) / count
    dev = torch.where(v, r - mean, torch.zeros_like(r))
    std = (dev.square().sum(dim=1, keepdim=True) / count).sqrt()
    adv = dev / (std + eps)
    flat = zero_variance_groups(r, v)
    return torch.where(flat[:, None] | ~v, torch.zeros_like(adv), adv)


def rl_zvp_token_advantages(
    rewards: Tensor,
    entropy: Tensor,
    mask: Tensor,
    *,
    alpha_zvp: float = 0.1,
    reward_max: float | None = None,
    reward_min: float | None = None,
    eps: float = 1e-6,
    valid: Tensor | None = None,
    flat_sign: Tensor | None = None,
) -> Tensor:
    """Token advantages with RL-ZVP for zero-variance groups (see module doc).

    ``rewards`` ``[P, G]``; ``entropy`` and ``mask`` ``[P, G, T]`` or ``[P·G, T]``; the
    result has the entropy's layout. Groups with variance get their group advantage
    (``group_advantages(rewards, eps, valid)``) on every valid token.
    """
    _check_rewards(rewards)
    P, G = rewards.shape
    flat_layout = entropy.dim() == 2
    if flat_layout:
        if entropy.shape[0] != P * G:
            raise ValueError(f"entropy [B, T] needs B = P·G = {P * G}, got {entropy.shape[0]}")
        H = entropy.reshape(P, G, -1)
    elif entropy.dim() == 3 and tuple(entropy.shape[:2]) == (P, G):
        H = entropy
    else:
        raise ValueError(f"entropy must be [P, G, T] or [P·G, T], got {tuple(entropy.shape)}")
    if mask.shape != entropy.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match entropy {tuple(entropy.shape)}")
    m = mask.reshape(H.shape).to(torch.bool)
    H = _as_float(H)
    r = _as_float(rewards).to(H.dtype)
    v = _valid_mask(r, valid)
    m = m & v[:, :, None]

    flat = zero_variance_groups(r, v)  # [P]
    if flat_sign is None:
        if reward_max is None or reward_min is None:
            raise ValueError("give reward_max and reward_min (or flat_sign)")
        if not reward_max > reward_min:
            raise ValueError(f"reward_max ({reward_max}) must exceed reward_min ({reward_min})")
        # the value of a flat group (its smallest valid reward; +inf when it has none)
        value = torch.where(v, r, torch.full_like(r, torch.inf)).amin(dim=1)
        at_max = (value - reward_max).abs() <= FLAT_TOL * max(1.0, abs(reward_max))
        at_min = (value - reward_min).abs() <= FLAT_TOL * max(1.0, abs(reward_min))
    else:
        s = flat_sign.reshape(P).to(torch.int64)
        at_max, at_min = s > 0, s < 0

    zeros = torch.zeros_like(H)
    Hm = torch.where(m, H, zeros)  # padding values never read
    Hmax = torch.where(m, H, torch.full_like(H, -torch.inf)).amax(dim=2, keepdim=True)
    Hmax = torch.where(torch.isfinite(Hmax), Hmax, torch.zeros_like(Hmax))
    pos = alpha_zvp * Hm
    neg = -alpha_zvp * (Hmax - Hm)
    ga = group_advantages(r, eps=eps, valid=v)[:, :, None].expand_as(H)

    pos_g = (flat & at_max)[:, None, None]
    neg_g = (flat & at_min & ~at_max)[:, None, None]
    out = torch.where(pos_g, pos, torch.where(neg_g, neg, torch.where(flat[:, None, None], zeros, ga)))
    out = torch.where(m, out, zeros)
    return out.reshape(entropy.shape) if flat_layout else out


def advantage_mass_share(advantages: Tensor, mask: Tensor, rows: Tensor) -> float:
    """Share of ``Σ |A| · m`` over ``[B, T]`` (or ``[B]``, one advantage per response)
    carried by the rows where ``rows`` ``[B]`` is True (module doc); 0 when the total is 0."""
    a = _as_float(advantages).abs()
    m = mask.to(a.dtype)
    if a.dim() == 1:
        a = a[:, None]
    mass = (a * m).sum(dim=1)
    total = float(mass.sum())
    return float(mass[rows.to(torch.bool)].sum()) / total if total > 0 else 0.0

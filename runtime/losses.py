r"""Policy losses for RL training of MoE LLMs (DESIGN.md §4, "Algorithm contracts").

All losses take token tensors of shape ``[B, T]`` (B responses padded to T tokens):

* ``logp[b,t]``      log-probability of the sampled token under the current policy
                     (the only input that carries gradient),
* ``old_logp[b,t]``  the behaviour (old) policy's log-probability (treated as constant),
* ``mask[b,t]``      1/True on response tokens, 0/False on padding (bool or {0,1} float),
* ``advantages``     ``[B]`` sequence advantage or ``[B, T]`` token advantage (constant),
* ``entropy[b,t]``   (ESPO) the old policy's token entropy, natural log, full vocabulary,
* ``token_weight``   optional ``[B, T]`` factor that multiplies every token's objective
                     term ``o_t`` before the averaging (e.g. the TIS weight below); the
                     denominators of the averages are token *counts* and are not weighted.

``sg`` is stop-gradient. Losses are minimised: ``loss = − objective``. Each loss returns a
frozen :class:`LossOutput` ``(loss: 0-dim Tensor, metrics: dict[str, float])``.

Formulas (copied from DESIGN.md §4; ``w_t`` = ``token_weight`` or 1, ``m`` = mask)
--------------------------------------------------------------------------------

GRPO / DAPO token loss (``grpo_loss``; clip_low=0.2, clip_high=0.28)::

    r = exp(logp − old_logp)
    o = min(r·A, clip(r, 1 − clip_low, 1 + clip_high)·A)
    objective = Σ_{b,t} m·w·o / Σ_{b,t} m                     (token mean over the batch)

GSPO-token (``gspo_loss``; clip_low=3e-4, clip_high=4e-4)::

    log s_b   = Σ_t m·(logp − old_logp) / Σ_t m
    s_{b,t}   = exp(sg(log s_b) + logp_{b,t} − sg(logp_{b,t}))  (value s_b, gradient per token)
    o         = min(s·A, clip(s, 1 − clip_low, 1 + clip_high)·A)
    objective = mean over b of (Σ_t m·w·o / Σ_t m)

ESPO (``espo_loss``; alpha=0.02, high_entropy_fraction ρ=0.2, vocab_size V)::

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

CISPO (``cispo_loss``; eps_high=0.28, eps_low=inf)::

    r = exp(logp − old_logp);  ŵ = sg(clip(r, 1 − eps_low, 1 + eps_high))
    objective = Σ m·w·ŵ·A·logp / Σ m

Train–inference correction (``train_inference_correction``; composable with any loss)::

    ω_t = π_train_old(t) / μ_rollout(t) = exp(old_logp_t − rollout_logp_t)
    tis:  token_weight_t = sg(min(ω_t, cap))     (mask unchanged)
    mis:  mask'_t = mask_t · [low ≤ ω_t ≤ high]  (token_weight = 1 on kept tokens)
    none: mask and token_weight = 1 unchanged

  Pass the returned ``mask`` and ``token_weight`` to the loss. With MIS the removed tokens
  leave every denominator *and* (for GSPO/ESPO) the sequence/group ratios and the ESPO
  entropy grouping, since those are all defined over the mask.

Decisions (where DESIGN.md is silent)
-------------------------------------

* All-masked responses (L_b = 0) contribute nothing: GRPO/CISPO's token mean simply has no
  terms from them, and GSPO/ESPO exclude them from the mean over b (the mean is over the
  responses with L_b ≥ 1). A batch with no valid token gives ``loss = 0`` (still attached to
  the graph, zero gradient) -- never NaN. Padding values of the inputs are ignored (they
  may be ``-inf`` or NaN); valid values must be finite.
* Only ``logp`` receives gradient; ``old_logp``, ``advantages``, ``entropy`` and
  ``token_weight`` are constants (detached).
* GRPO is plain autograd through its formula. GSPO-token and ESPO are computed per group:
  since ``s_{τ,t} = exp(sg(log s_τ) + logp_t − sg(logp_t))`` has value ``s_τ`` and
  ``∂s_{τ,t}/∂logp_t = s_τ``, the gradient is ``∂loss/∂logp_t = −c_t·w_t·s_τ·A_t·1[t not
  clipped]`` (``c_t`` the token's averaging weight), which is computed directly and
  attached to ``logp`` by a small autograd Function; CISPO (linear in logp) likewise. Value
  and gradient are exactly those of the formulas (the tests compare them with autograd of
  loop references); second derivatives are not supported.
* ESPO's grouping is a vectorised top-k per response without a sort (one integer
  ``topk`` over all rows, then the tie rule); see ``_high_group``. It reads K = max_b k_b,
  the sign of min(entropy) and whether any row has surplus ties back to the host.
* Everything is computed in log space: sequence/group ratios are ``exp(Σ log r / count)``,
  never products of ratios, so T = 32768 is safe. As in verl, every log ratio fed to
  ``exp`` is clamped to at most ``MAX_LOG_RATIO`` (= 20, a ratio of 4.85e8) so that float32
  cannot overflow into ``inf`` / NaN: a token (GRPO, CISPO) or group (GSPO, ESPO) whose
  ratio exceeds 4.85e8 gets the ratio 4.85e8 (for GRPO's token also a zero gradient, like
  a dual clip). Nothing changes below that.
* Half-precision inputs are promoted to float32; float64 stays float64. Gradients come
  back in logp's dtype.
* ``k_b = ceil(ρ·L_b)`` is evaluated in float64 with a 1e-9 tolerance against rounding
  (``ρ = 0.07, L_b = 100``: 7.000000000000001 gives 7, not 8), and is at least 1 when
  L_b ≥ 1.
* ESPO needs entropy ≥ 0 (ε_τ ≥ 0); the grouping itself orders any finite values.
* ``eps_low=None`` (the spec's "unbounded below") is the same as ``inf``.
* Means over an empty set in the metrics are reported as 0.0.

Metric keys (all Python floats; "valid" = mask after any correction)
-------------------------------------------------------------------

Every loss:
  ``loss``           the loss value (− objective)
  ``n_tokens``       number of valid tokens, Σ m
  ``n_responses``    number of responses with at least one valid token
  ``ratio/mean``     mean over valid tokens of the importance ratio used in ``o``
                     (r_t for GRPO/CISPO, s_b for GSPO, s_τ for ESPO)
  ``ratio/min``, ``ratio/max``   min / max of that ratio over valid tokens
  ``approx_kl``      mean over valid tokens of (old_logp − logp)  (verl's ``ppo_kl``)
  ``clip_frac``      fraction of valid tokens whose term is clipped: for the PPO-style
                     losses the clipped branch is strictly smaller, i.e. the token gets no
                     gradient (A > 0 and ratio > 1 + ε_high, or A < 0 and ratio < 1 − ε_low);
                     for CISPO the fraction of tokens whose IS weight is clipped
ESPO adds, per entropy group g ∈ {high, low}:
  ``clip_frac/high``, ``clip_frac/low``   clip fraction among the group's valid tokens
  ``eps/high``, ``eps/low``               mean over responses (that have a non-empty group
                                          g) of ε_g
  ``n_tokens/high``, ``n_tokens/low``     tokens in the group (over the batch)
  ``entropy/high``, ``entropy/low``       mean entropy over the group's tokens
CISPO adds:
  ``is_weight/mean``  mean over valid tokens of the clipped IS weight ŵ
``train_inference_correction`` returns (``correction/`` prefix):
  ``correction/n_tokens``        valid tokens before the correction
  ``correction/frac_masked``     fraction of valid tokens removed (MIS; 0 otherwise)
  ``correction/mean_weight``     mean of the returned token_weight over kept tokens
  ``correction/frac_capped``     fraction of valid tokens with ω_t > cap (TIS; 0 otherwise)
  ``correction/mean_raw_weight`` mean of ω_t over valid tokens (before cap / mask)

Registry
--------

``LOSSES`` maps a name (``"grpo"``, ``"gspo"``, ``"espo"``, ``"cispo"``) to a
:class:`LossSpec`; :func:`register_loss` adds one; :func:`compute_loss` looks a loss up,
merges the spec's ``algorithm.<loss>`` parameters over the defaults (unknown keys raise
``ValueError``) and calls it.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "LOSSES",
    "MAX_LOG_RATIO",
    "CorrectionOutput",
    "LossOutput",
    "LossSpec",
    "cispo_loss",
    "compute_loss",
    "espo_high_entropy_mask",
    "espo_loss",
    "grpo_loss",
    "gspo_loss",
    "register_loss",
    "train_inference_correction",
]

#: Upper clamp of every log ratio before ``exp`` (verl uses the same bound).
MAX_LOG_RATIO = 20.0
#: Tolerance of ``k_b = ceil(ρ·L_b)`` against float rounding.
_K_TOL = 1e-9


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class LossOutput:
    """A loss value (0-dim tensor, to minimise) and its metrics (Python floats)."""

    loss: Tensor
    metrics: dict[str, float]


@dataclass(frozen=True)
class CorrectionOutput:
    """Result of :func:`train_inference_correction`.

    ``mask`` is the (possibly reduced) mask, same dtype as the input mask;
    ``token_weight`` a detached float tensor (0 on padding) to pass as a loss's
    ``token_weight``.
    """

    mask: Tensor
    token_weight: Tensor
    metrics: dict[str, float]


# --------------------------------------------------------------------------- helpers
# Masking is done with float arithmetic (x·mask, nan_to_num) rather than torch.where:
# on CPU a where/masked_fill over [B, T] costs as much as ~10 float ops.


@dataclass(frozen=True)
class _Batch:
    m: Tensor  # bool [B, T]
    mf: Tensor  # [B, T] 1.0 on valid tokens, 0.0 on padding (compute dtype)
    log_r: Tensor  # [B, T] logp − old_logp, 0 on padding; carries grad only if asked
    adv: Tensor  # [B, 1] or [B, T] (0 on padding), detached
    tw: Tensor | None  # [B, T] token weight, 0 on padding, detached; or None
    L: Tensor  # [B] valid tokens per response (compute dtype)
    n: Tensor  # 0-dim: valid tokens in the batch
    n_resp: Tensor  # 0-dim: responses with L_b ≥ 1


def _compute_dtype(t: Tensor) -> torch.dtype:
    if not t.is_floating_point():
        raise ValueError(f"log-probabilities must be a floating tensor, got {t.dtype}")
    return torch.promote_types(t.dtype, torch.float32)


def _masked(x: Tensor, mf: Tensor) -> Tensor:
    """x on valid tokens, 0 on padding, whatever padding holds (NaN, ±inf)."""
    return torch.nan_to_num(x * mf, nan=0.0)


def _as_float(x: Tensor) -> Tensor:
    """0/1 float32 from a bool tensor (the uint8 route is several times faster on CPU)."""
    return x.view(torch.uint8).to(torch.float32) if x.dtype == torch.bool else x


def _prepare(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    token_weight: Tensor | None,
    *,
    track_grad: bool,
) -> _Batch:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    shape = logp.shape
    for name, t in (("old_logp", old_logp), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if token_weight is not None and token_weight.shape != shape:
        raise ValueError(
            f"token_weight has shape {tuple(token_weight.shape)}, expected {tuple(shape)}"
        )
    if advantages.shape not in (shape[:1], shape):
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(shape)}, got {tuple(advantages.shape)}"
        )
    dtype = _compute_dtype(logp)
    m = mask if mask.dtype == torch.bool else mask != 0
    mf = _as_float(m).to(dtype)
    if track_grad:  # GRPO: the graph goes through log_r
        log_r = torch.where(m, logp.to(dtype) - old_logp.detach().to(dtype), 0.0)
    with torch.no_grad():
        if not track_grad:
            log_r = _masked(logp.detach().to(dtype) - old_logp.to(dtype), mf)
        adv = advantages.detach().to(dtype)
        adv = adv[:, None] if adv.dim() == 1 else _masked(adv, mf)
        tw = None if token_weight is None else _masked(token_weight.detach().to(dtype), mf)
        L = mf.sum(1)
        return _Batch(m=m, mf=mf, log_r=log_r, adv=adv, tw=tw, L=L, n=L.sum(), n_resp=(L > 0).sum())


def _check(name: str, value: float, *, low: float = 0.0, low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = value >= low if low_inclusive else value > low
    if not ok or math.isnan(value):
        op = "≥" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low}, got {value}")
    return value


def _ratio(log_ratio: Tensor) -> Tensor:
    """exp of a log ratio clamped above at MAX_LOG_RATIO (no float32 overflow)."""
    return torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))


class _WithGrad(torch.autograd.Function):
    """``value`` (0-dim) whose gradient w.r.t. ``logp`` is ``grad`` ([B, T], precomputed).

    Used where the loss is linear in ``logp_t − sg(logp_t)`` to first order (GSPO-token,
    ESPO, CISPO): the value and the first derivative are exactly those of the formula.
    """

    @staticmethod
    def forward(ctx: Any, logp: Tensor, value: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.logp_dtype = logp.dtype
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.logp_dtype), None, None


def _token_metrics(b: _Batch, ratio: Tensor, clipped: Tensor) -> dict[str, Tensor]:
    """Common metrics of a loss with a per-token ratio (GRPO, CISPO)."""
    r = ratio.detach()
    rm = r * b.mf  # ratios are ≥ 0, so padding (0) never wins the max
    nc = b.n.clamp(min=1)
    if r.numel():
        r_min = (rm + (1.0 - b.mf) * torch.finfo(r.dtype).max).amin().where(b.n > 0, 0.0)
        r_max = rm.amax()
    else:
        r_min = r_max = b.n * 0
    return {
        "n_tokens": b.n,
        "n_responses": b.n_resp,
        "ratio/mean": rm.sum() / nc,
        "ratio/min": r_min,
        "ratio/max": r_max,
        "approx_kl": -b.log_r.detach().sum() / nc,
        "clip_frac": (clipped & b.m).sum() / nc,
    }


def _finish(loss: Tensor, metrics: dict[str, Tensor]) -> LossOutput:
    """Convert all metrics (0-dim tensors) with a single device→host transfer."""
    keys = ["loss", *metrics]
    vals = [loss.detach(), *(v.to(loss.dtype) for v in metrics.values())]
    floats = torch.stack([v.reshape(()) for v in vals]).tolist()
    return LossOutput(loss=loss, metrics=dict(zip(keys, floats, strict=True)))


# --------------------------------------------------------------------------- losses


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


# --------------------------------------------------------------------------- correction


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


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, its tunable parameters with defaults, and its inputs.

    ``defaults`` holds exactly the keyword parameters a spec's ``algorithm.<loss>`` section
    may set; ``needs_entropy`` / ``needs_vocab_size`` say whether ``compute_loss`` must be
    given ``entropy`` / ``vocab_size``.
    """

    fn: Callable[..., LossOutput]
    defaults: dict[str, Any]
    needs_entropy: bool
    needs_vocab_size: bool = False


LOSSES: dict[str, LossSpec] = {}

_F = TypeVar("_F", bound=Callable[..., LossOutput])
_DATA_PARAMS = frozenset({"token_weight", "vocab_size"})


def register_loss(name: str) -> Callable[[_F], _F]:
    """Decorator: register ``fn`` as loss ``name`` in :data:`LOSSES`.

    ``fn(logp, old_logp, advantages, mask[, entropy], *, <params with defaults>,
    [vocab_size], token_weight=None) -> LossOutput``. The keyword-only parameters with
    defaults (other than ``token_weight``) become ``LossSpec.defaults``.
    """

    def deco(fn: _F) -> _F:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        params = inspect.signature(fn).parameters
        defaults = {
            p.name: p.default
            for p in params.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and p.default is not inspect.Parameter.empty
            and p.name not in _DATA_PARAMS
        }
        LOSSES[name] = LossSpec(
            fn=fn,
            defaults=defaults,
            needs_entropy="entropy" in params,
            needs_vocab_size="vocab_size" in params,
        )
        return fn

    return deco


register_loss("grpo")(grpo_loss)
register_loss("gspo")(gspo_loss)
register_loss("espo")(espo_loss)
register_loss("cispo")(cispo_loss)


def compute_loss(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    entropy: Tensor | None = None,
    vocab_size: int | None = None,
    token_weight: Tensor | None = None,
) -> LossOutput:
    """Compute loss ``name`` with ``params`` (the spec's ``algorithm.<name>`` section).

    Missing params take the loss's defaults; an unknown loss name or parameter raises
    ``ValueError``, as does a missing ``entropy`` / ``vocab_size`` for a loss that needs it.
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for loss {name!r}; allowed: {sorted(spec.defaults)}"
        )
    kwargs: dict[str, Any] = {**spec.defaults, **params}
    args: list[Tensor] = [logp, old_logp, advantages, mask]
    if spec.needs_entropy:
        if entropy is None:
            raise ValueError(f"loss {name!r} needs entropy (the old policy's token entropy)")
        args.append(entropy)
    if spec.needs_vocab_size:
        if vocab_size is None:
            raise ValueError(f"loss {name!r} needs vocab_size")
        kwargs["vocab_size"] = vocab_size
    return spec.fn(*args, token_weight=token_weight, **kwargs)

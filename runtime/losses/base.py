"""Shared parts of the policy losses: outputs, input preparation, the closed-form gradient.

Notation, defaults and decisions common to every loss are in the package docstring
(``runtime/losses/__init__.py``). Here:

* :class:`LossOutput` ``(loss, metrics)`` and :class:`CorrectionOutput`;
* ``_prepare`` → ``_Batch``: shape checks, dtype promotion (half → float32), the masked
  log ratio ``log_r = logp − old_logp`` (0 on padding), detached advantages / token weights,
  ``L_b = Σ_t m`` and the batch counts;
* ``_ratio(x) = exp(min(x, MAX_LOG_RATIO))`` (no float32 overflow);
* ``_WithGrad``: a 0-dim value whose gradient w.r.t. ``logp`` is a precomputed ``[B, T]``
  tensor (GSPO-token, ESPO, CISPO: ``∂loss/∂logp_t = −c_t·w_t·s_τ·A_t·1[t not clipped]``);
* ``_token_metrics`` / ``_finish``: the common metrics and one device→host transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Upper clamp of every log ratio before ``exp`` (verl uses the same bound).
MAX_LOG_RATIO = 20.0


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

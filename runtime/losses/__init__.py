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

Modules (one per algorithm, each with its formula from DESIGN.md §4; ``w_t`` =
``token_weight`` or 1, ``m`` = mask)
--------------------------------------------------------------------------------

* ``base``        outputs (:class:`LossOutput`, :class:`CorrectionOutput`) and shared helpers
* ``grpo``        GRPO / DAPO token loss, ``grpo_loss``
* ``gspo``        GSPO-token, ``gspo_loss`` (and the grouped PPO core it shares with ESPO)
* ``espo``        ESPO, ``espo_loss``, ``espo_high_entropy_mask``
* ``cispo``       CISPO, ``cispo_loss``
* ``correction``  train–inference correction (TIS / MIS), ``train_inference_correction``
* ``registry``    ``LOSSES``, ``LossSpec``, ``register_loss``, ``compute_loss``

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
* Everything is computed in log space: sequence/group ratios are ``exp(Σ log r / count)``,
  never products of ratios, so T = 32768 is safe. As in verl, every log ratio fed to
  ``exp`` is clamped to at most ``MAX_LOG_RATIO`` (= 20, a ratio of 4.85e8) so that float32
  cannot overflow into ``inf`` / NaN: a token (GRPO, CISPO) or group (GSPO, ESPO) whose
  ratio exceeds 4.85e8 gets the ratio 4.85e8 (for GRPO's token also a zero gradient, like
  a dual clip). Nothing changes below that.
* Half-precision inputs are promoted to float32; float64 stays float64. Gradients come
  back in logp's dtype.
* Means over an empty set in the metrics are reported as 0.0.
* ESPO's grouping, ``k_b`` rounding and entropy sign: see ``runtime.losses.espo``.

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
ESPO (``clip_frac/``, ``eps/``, ``n_tokens/``, ``entropy/`` per entropy group), CISPO
(``is_weight/mean``) and ``train_inference_correction`` (``correction/``) add their own:
see their modules. A step's metrics combine its micro-batches' (counts summed per optimizer
step, extremes kept, means weighted): ``runtime.losses.aggregate``.

Importing this package registers the four built-in losses (``runtime.losses.registry``).
"""

from __future__ import annotations

from runtime.losses.base import MAX_LOG_RATIO, CorrectionOutput, LossOutput
from runtime.losses.cispo import cispo_loss
from runtime.losses.correction import train_inference_correction
from runtime.losses.espo import espo_high_entropy_mask, espo_loss
from runtime.losses.grpo import grpo_loss
from runtime.losses.gspo import gspo_loss
from runtime.losses.registry import LOSSES, LossSpec, compute_loss, register_loss

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

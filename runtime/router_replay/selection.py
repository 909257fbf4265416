"""Top-k expert selection and gate recomputation (R2 / R3 maths).

With live router logits s ∈ R^E (``select_experts``):

* softmax routers: p = softmax(s); sel = top-k(p (+ bias)); with ``norm_topk_prob``
  g_i = p_i / Σ_{j∈sel} p_j = e^{s_i} / Σ_{j∈sel} e^{s_j}  (i ∈ sel), otherwise g_i = p_i.
* sigmoid routers (DeepSeek-V3): σ = sigmoid(s); sel = top-k(σ + b) (the expert bias b only
  steers the choice); g_i = σ_i / (Σ_{j∈sel} σ_j + 1e-20) with ``norm_topk_prob``, else σ_i.
* replay: sel is given (the replay ids); the gates use the same formulas on the live logits,
  so ∂g/∂s ≠ 0 and the router keeps receiving gradient.

Also home of ``RoutingMismatch`` and the ``ReplayMode`` / ``ScoreFunction`` literals.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["ReplayMode", "RoutingMismatch", "ScoreFunction", "select_experts"]

ReplayMode = Literal["off", "record", "replay"]
ScoreFunction = Literal["softmax", "sigmoid"]

_MODES: tuple[str, ...] = ("off", "record", "replay")
# Below this sum of selected softmax probabilities the p_i / Σ p_j form loses precision
# (the p_i are subnormal or zero); the gates are then taken from softmax over the
# selected logits, which is the same quantity computed stably.
_UNDERFLOW = 1e-30
# DeepSeek-V3's guard in the sigmoid gate normalisation.
_SIGMOID_EPS = 1e-20


class RoutingMismatch(ValueError):
    """Routing ids do not fit the model or the sequence they are applied to."""


def select_experts(
    logits: torch.Tensor,
    top_k: int,
    *,
    score_function: ScoreFunction = "softmax",
    expert_bias: torch.Tensor | None = None,
    norm_topk_prob: bool = True,
    replay_ids: torch.Tensor | None = None,
    replay_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token and their gate weights.

    ``logits``: router logits s, shape [N, E]. Returns ``(gates [N, k] float32,
    expert_ids [N, k] int64)``.

    Scores: softmax routers p = softmax(s) (float32), sigmoid routers σ = sigmoid(s).
    Normal selection: ids = top-k(score + expert_bias) (the bias, if any, only steers
    the choice). Replay: ids = ``replay_ids`` (any integer dtype, [N, k]); where
    ``replay_mask`` [N] (bool) is given, rows with ``False`` use the normal selection.

    Gates from the live scores at the chosen ids:

    * softmax, ``norm_topk_prob``: g_i = p_i / Σ_{j∈sel} p_j = e^{s_i}/Σ_{j∈sel} e^{s_j}
      (bitwise the same arithmetic as transformers' Qwen3-MoE router; in replay, rows
      whose Σ_{j∈sel} p_j underflows below 1e-30 use softmax over the selected logits);
    * softmax, not normalised: g_i = p_i (full-softmax probability at the selected id);
    * sigmoid, ``norm_topk_prob``: g_i = σ_i / (Σ_{j∈sel} σ_j + 1e-20) (DeepSeek-V3);
    * sigmoid, not normalised: g_i = σ_i.

    Gradients flow from the gates to ``logits`` in every mode (replay included).
    Ids out of range in ``replay_ids`` are not checked here (that would synchronise
    the device on every call); ``RouterReplay`` / ``RoutingTrace`` check them once.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, E], got shape {tuple(logits.shape)}")
    n, e = logits.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, {e}], got {top_k}")
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
    else:
        raise ValueError(f"score_function must be 'softmax' or 'sigmoid', got {score_function!r}")

    live_ids: torch.Tensor | None = None
    top: torch.Tensor | None = None
    if replay_ids is None or replay_mask is not None:
        if expert_bias is None:
            top, live_ids = torch.topk(scores, top_k, dim=-1)
        else:
            if expert_bias.shape != (e,):
                raise ValueError(
                    f"expert_bias must have shape ({e},), got {tuple(expert_bias.shape)}"
                )
            choice = scores.detach() + expert_bias.detach().to(scores.dtype)
            live_ids = torch.topk(choice, top_k, dim=-1).indices

    if replay_ids is None:
        assert live_ids is not None
        ids = live_ids
        if top is None:
            top = scores.gather(1, ids)
    else:
        if replay_ids.shape != (n, top_k):
            raise RoutingMismatch(
                f"replay ids have shape {tuple(replay_ids.shape)}, but the router sees "
                f"{n} tokens with top_k={top_k} (expected ({n}, {top_k}))"
            )
        ids = replay_ids.to(device=logits.device, dtype=torch.long)
        if replay_mask is not None:
            if replay_mask.shape != (n,):
                raise RoutingMismatch(
                    f"replay mask has shape {tuple(replay_mask.shape)}, expected ({n},)"
                )
            assert live_ids is not None
            mask = replay_mask.to(device=logits.device, dtype=torch.bool)
            ids = torch.where(mask[:, None], ids, live_ids)
        top = scores.gather(1, ids)

    if not norm_topk_prob:
        return top, ids
    denom = top.sum(dim=-1, keepdim=True)
    if score_function == "sigmoid":
        return top / (denom + _SIGMOID_EPS), ids
    if replay_ids is None:
        # the largest probability is ≥ 1/E: no underflow possible.
        return top / denom, ids
    gates = top / denom.clamp_min(_UNDERFLOW)
    stable = torch.softmax(logits.gather(1, ids).float(), dim=-1)
    return torch.where(denom < _UNDERFLOW, stable, gates), ids

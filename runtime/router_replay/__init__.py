"""Router replay for MoE RL training (R2 / R3).

The problem: the experts a token is sent to are chosen by a discrete top-k, so the
inference engine that sampled a response and the trainer that computes its
log-probabilities can route the same token to different experts (different
kernels, precision, batch composition, or simply newer weights). Replay makes the
trainer select *exactly* a given set of experts while keeping the gate weights a
differentiable function of the trainer's own router logits, so the router still
learns.

* **R3** (rollout routing replay): the rollout engine returns, per token and MoE
  layer, the top-k expert ids it used (vLLM: ``routed_experts``); the trainer replays
  them in its old-policy and update forwards.
* **R2** (trainer routing replay): the ids are recorded in the trainer's own
  old-policy forward and replayed in the update forwards of the same batch.

Selection and gates (``select_experts``), with live router logits s ∈ R^E:

* softmax routers: p = softmax(s); normal selection sel = top-k(p (+ bias));
  with ``norm_topk_prob`` the gates are
  g_i = p_i / Σ_{j∈sel} p_j = e^{s_i} / Σ_{j∈sel} e^{s_j}  (i ∈ sel),
  otherwise g_i = p_i (the full-softmax probability at the selected id).
* sigmoid routers (DeepSeek-V3): σ = sigmoid(s); sel = top-k(σ + b) where the expert
  bias b only influences the choice; gates g_i = σ_i / (Σ_{j∈sel} σ_j + 1e-20) with
  ``norm_topk_prob`` (as DeepSeek-V3 does), otherwise g_i = σ_i.
* replay: sel is given (the replay ids); the gates use the same formulas on the live
  logits, so ∂g/∂s ≠ 0 and the router keeps receiving gradient.

Storage: ids are kept as uint8 when the model has ≤ 256 experts, else int16.

transformers' DeepSeek-V3 router (``patch_deepseek_v3``) selects with the bias and the group
limit, sel = top-k over the chosen groups of (σ + b); in replay sel is the given ids (the bias
and the group limit are already in the recorded choice) and the gates are its own formula on
the live scores, g_i = σ_i / (Σ_{j∈sel} σ_j + 1e-20) · routed_scaling_factor (normalised only
with ``norm_topk_prob``), so the router weight keeps its gradient. GLM-4.5's router
(``Glm4MoeTopkRouter``, ``patch_glm4_moe``) has the same fields and arithmetic and takes the
same replay forward.

Modules: ``selection`` (``select_experts``, the gate formulas, ``RoutingMismatch``),
``replay`` (``RouterReplay``, ``RouterReplayGroup``, ``Recording``, ``collect_router_replays``),
``trace`` (``RoutingTrace``, ``align_routing``), ``hf`` (the transformers router patches),
``codec`` (vLLM ``routed_experts`` codec, id storage) and ``testing`` (``MoEBlock``, a small
torch MoE block for tests and benches). Every name is re-exported here.

This package depends on torch and numpy only (transformers is imported lazily in
``patch_qwen3_moe`` / ``patch_deepseek_v3``); it never imports the ``compiler`` package.
"""

from __future__ import annotations

from runtime.router_replay.codec import (
    compact,
    decode_routed_experts,
    encode_routed_experts,
    routing_bytes_per_token,
    storage_dtype,
)
from runtime.router_replay.hf import (
    patch_deepseek_v3,
    patch_glm4_moe,
    patch_moe_routers,
    patch_qwen3_moe,
)
from runtime.router_replay.replay import (
    Recording,
    RouterReplay,
    RouterReplayGroup,
    collect_router_replays,
)
from runtime.router_replay.selection import (
    ReplayMode,
    RoutingMismatch,
    ScoreFunction,
    select_experts,
)
from runtime.router_replay.testing import MoEBlock
from runtime.router_replay.trace import RoutingTrace, align_routing

__all__ = [
    "MoEBlock",
    "Recording",
    "ReplayMode",
    "RouterReplay",
    "RouterReplayGroup",
    "RoutingMismatch",
    "RoutingTrace",
    "ScoreFunction",
    "align_routing",
    "collect_router_replays",
    "compact",
    "decode_routed_experts",
    "encode_routed_experts",
    "patch_deepseek_v3",
    "patch_glm4_moe",
    "patch_moe_routers",
    "patch_qwen3_moe",
    "routing_bytes_per_token",
    "select_experts",
    "storage_dtype",
]

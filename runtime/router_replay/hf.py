"""Router replay patches for transformers' MoE routers (Qwen3-MoE, DeepSeek-V3, GLM-4.5).

Each supported router gets a ``RouterReplay`` and a per-instance forward. Qwen3-MoE in
replay: g = softmax of the live logits at the target ids, renormalised with
``norm_topk_prob``. DeepSeek-V3 (and GLM-4.5, same fields and arithmetic) select with the bias
and the group limit, sel = top-k over the chosen groups of (σ + b); in replay sel is the
given ids (bias and group limit are already in the recorded choice) and the gates are the
router's own formula on the live scores,
g_i = σ_i / (Σ_{j∈sel} σ_j + 1e-20) · routed_scaling_factor (normalised only with
``norm_topk_prob``), so the router weight keeps its gradient. transformers is imported
lazily, in ``_router_kinds``.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from runtime.router_replay.replay import RouterReplay, RouterReplayGroup
from runtime.router_replay.selection import _SIGMOID_EPS, RoutingMismatch

__all__ = ["patch_deepseek_v3", "patch_glm4_moe", "patch_moe_routers", "patch_qwen3_moe"]


def _qwen3_router_forward(
    self: nn.Module, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replacement ``Qwen3MoeTopKRouter.forward`` (bound per instance)."""
    rr: RouterReplay = self.router_replay
    if rr.mode != "replay":
        out = type(self).forward(self, hidden_states)
        if rr.mode == "record":
            rr.record_indices(out[2])
        return out
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    gates, ids = rr.route(
        router_logits, score_function="softmax", norm_topk_prob=self.norm_topk_prob
    )
    return router_logits, gates.to(router_logits.dtype), ids


def _deepseek_router_forward(
    self: nn.Module, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replacement ``DeepseekV3TopkRouter.forward`` (bound per instance).

    Replay: the target ids are taken as they are (no bias, no group limit: both are in the
    recorded choice); gates from the live sigmoid scores at those ids, with the router's own
    arithmetic (gather, ``/= Σ + 1e-20`` when ``norm_topk_prob``, ``· routed_scaling_factor``),
    so a replay of the recorded ids with unchanged weights is bitwise the normal forward.
    Rows the replay mask leaves out take the router's own (biased, group-limited) choice."""
    rr: RouterReplay = self.router_replay
    if rr.mode != "replay":
        out = type(self).forward(self, hidden_states)
        if rr.mode == "record":
            rr.record_indices(out[2])
        return out
    ids, mask = rr._device_target(hidden_states.device)
    if mask is not None:  # the live choice for the rows without replay ids
        live = type(self).forward(self, hidden_states)[2]
        ids = torch.where(mask[:, None], ids, live)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    if ids.shape[0] != router_logits.shape[0]:
        raise RoutingMismatch(
            f"layer {rr.layer}: replay ids cover {ids.shape[0]} tokens, the router sees "
            f"{router_logits.shape[0]}"
        )
    scores = router_logits.sigmoid()
    topk_weights = scores.gather(1, ids)
    if self.norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + _SIGMOID_EPS
        topk_weights = topk_weights / denominator
    topk_weights = topk_weights * self.routed_scaling_factor
    return router_logits, topk_weights, ids


def _router_kinds() -> list[tuple[type, object]]:
    """(router class, replacement forward) of each HF MoE family replay supports."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    # GLM-4.5's router is DeepSeek-V3's (same fields, same arithmetic): one replay forward
    return [(Qwen3MoeTopKRouter, _qwen3_router_forward),
            (DeepseekV3TopkRouter, _deepseek_router_forward),
            (Glm4MoeTopkRouter, _deepseek_router_forward)]


def _patch(model: nn.Module, kinds: list[tuple[type, object]], what: str) -> RouterReplayGroup:
    group = RouterReplayGroup()
    for module in model.modules():
        forward = next((f for cls, f in kinds if isinstance(module, cls)), None)
        if forward is None:
            continue
        rr = getattr(module, "router_replay", None)
        if not isinstance(rr, RouterReplay):
            rr = RouterReplay(int(module.num_experts), int(module.top_k), layer=len(group))
            module.router_replay = rr
            # a bound method (not a closure) so that copy.deepcopy rebinds it to the copy
            module.forward = types.MethodType(forward, module)  # type: ignore[arg-type]
        group.append(rr)
    if not group:
        raise ValueError(f"model has no {what} modules")
    return group


def patch_qwen3_moe(model: nn.Module) -> RouterReplayGroup:
    """Attach a ``RouterReplay`` to every ``Qwen3MoeTopKRouter`` of ``model``.

    Each router's forward (→ router_logits, top-k weights, top-k indices) is replaced
    on the instance: "off" and "record" call the original forward (record keeps the
    indices); "replay" computes the same logits and takes the gates of the target ids
    with the router's own formula (softmax, renormalised if ``norm_topk_prob``), so a
    replay of the ids recorded with unchanged weights is bitwise the normal forward.
    Layers are numbered in module order over MoE layers only (dense
    ``mlp_only_layers`` have no router), the order of vLLM's moe_layers axis.
    Idempotent. Returns the group (a ``list[RouterReplay]``).
    """
    return _patch(model, _router_kinds()[:1], "Qwen3MoeTopKRouter")


def patch_deepseek_v3(model: nn.Module) -> RouterReplayGroup:
    """``patch_qwen3_moe`` for transformers' ``DeepseekV3TopkRouter`` (DeepSeek-V3,
    Moonlight): replay in :func:`_deepseek_router_forward`. Dense leading layers
    (``first_k_dense_replace``) have no router; MoE layers are numbered from 0."""
    return _patch(model, _router_kinds()[1:2], "DeepseekV3TopkRouter")


def patch_glm4_moe(model: nn.Module) -> RouterReplayGroup:
    """``patch_deepseek_v3`` for transformers' ``Glm4MoeTopkRouter`` (GLM-4.5), whose fields and
    arithmetic are DeepSeek-V3's: replay in :func:`_deepseek_router_forward`."""
    return _patch(model, _router_kinds()[2:], "Glm4MoeTopkRouter")


def patch_moe_routers(model: nn.Module) -> RouterReplayGroup:
    """The replay patch of whichever supported HF MoE family ``model`` is (Qwen3-MoE,
    DeepSeek-V3, GLM-4.5): what the embedded trainer and rollout engine call."""
    return _patch(model, _router_kinds(), "Qwen3-MoE, DeepSeek-V3 or GLM-4.5 router")

"""Checks shared by the family tests of tests/megatron (DeepSeek-V3, GLM-4.5, the dense
families): a megatron-core GPTModel against the HF model it was converted from, and R3 with a
sigmoid router. fp32 on CPU; tolerances in each test module's doc."""

from __future__ import annotations

from typing import Any

import torch

from tests.megatron._worker import batch, scored

ATOL = 1e-4  # max |Δ logp|, max |Δ entropy|; gradients: 1e-4 · max |g|


def gate_ids(hf: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The experts each HF MoE layer's router (``mlp.gate``) chooses, per layer [tokens, k]."""
    got: list[torch.Tensor] = []

    def keep(_m: Any, _i: Any, out: tuple[torch.Tensor, ...]) -> None:
        got.append(out[2].detach().clone())

    hooks = [layer.mlp.gate.register_forward_hook(keep)
             for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    try:
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return got


def check_against_hf(hf: Any, model: Any) -> None:
    """``model`` (weights loaded from ``hf``) gives HF's log-probs and entropies on
    :func:`batch`, the gradients of HF's converted with ``hf_to_megatron`` (a selection-bias
    buffer: none), and exports HF's weights back bit for bit."""
    from runtime.megatron.hf_weights import gather_full_state_dict, hf_to_megatron, megatron_to_hf
    from runtime.megatron.logprobs import megatron_logprobs
    from runtime.trainer import sequence_logprobs

    ids, mask = batch()
    m = scored(mask)
    ref, ref_h = sequence_logprobs(hf, ids, mask, with_entropy=True)
    got, got_h = megatron_logprobs(model, ids, mask, with_entropy=True)
    assert ref_h is not None and got_h is not None
    d_logp = (got - ref)[m].abs().max().item()
    d_ent = (got_h - ref_h)[m].abs().max().item()
    assert d_logp <= ATOL, f"max |Δ logp| = {d_logp:.3g}"
    assert d_ent <= ATOL, f"max |Δ entropy| = {d_ent:.3g}"
    ref[m].sum().backward()
    got[m].sum().backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in hf.named_parameters()}
    grads.update({n: torch.zeros_like(b) for n, b in hf.named_buffers()
                  if n.endswith("e_score_correction_bias")})
    want = hf_to_megatron(grads, hf.config)
    scale = max(g.abs().max().item() for g in want.values())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        diff = (p.grad - want[name]).abs().max().item()
        assert diff <= 1e-4 * scale, f"{name}: max |Δ grad| = {diff:.3g} (scale {scale:.3g})"
    exported = megatron_to_hf(gather_full_state_dict(model), hf.config)
    for key, value in hf.state_dict().items():
        assert torch.equal(exported[key], value), key


def check_sigmoid_r3(hf: Any, model: Any, patch: Any) -> None:
    """R3 through megatron-core's RouterReplay with a sigmoid router (DeepSeek-V3's, which
    GLM-4.5 shares), ``model`` built with ``routing_replay=True`` from ``hf``, one MoE layer
    (layer 1) of 8 experts: the record is HF's choice (bias and group limit included); after
    the router weights and the selection bias change (in both models alike), the replay routes
    to exactly the recorded experts, gives the log-probs of the embedded replay of HF
    (``patch``: ``runtime.router_replay``'s patch of the family), and the router weight gets a
    gradient."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from runtime.megatron.logprobs import megatron_logprobs
    from runtime.megatron.replay import MegatronReplay, from_megatron_layout
    from runtime.router_replay import RoutingTrace
    from runtime.trainer import sequence_logprobs

    assert len(RouterReplay.global_router_replay_instances) == 1  # one MoE layer
    ids, mask = batch()
    b, t = ids.shape
    replay = MegatronReplay()
    with torch.no_grad(), replay.recording() as records:
        megatron_logprobs(model, ids, mask)
    recorded = from_megatron_layout(records, b, t)  # [B, T, L, k]
    real = mask.bool()
    hf_ids = gate_ids(hf, ids, mask)[0].view(b, t, -1)
    assert torch.equal(recorded[:, :, 0].sort(-1).values[real], hf_ids.sort(-1).values[real])

    g = torch.Generator().manual_seed(5)
    delta = torch.randn(8, int(hf.config.hidden_size), generator=g)
    bias = torch.linspace(-1.0, 1.0, 8)
    router = model.decoder.layers[1].mlp.router
    with torch.no_grad():
        router.weight.add_(delta)
        router.expert_bias.copy_(bias)
        hf.model.layers[1].mlp.gate.weight.add_(delta)
        hf.model.layers[1].mlp.gate.e_score_correction_bias.copy_(bias)
    free = gate_ids(hf, ids, mask)[0].view(b, t, -1)
    assert not torch.equal(free.sort(-1).values[real], hf_ids.sort(-1).values[real])

    trace = RoutingTrace(recorded.to(torch.uint8), 8)
    used: list[torch.Tensor] = []
    hook = router.register_forward_hook(lambda _m, _i, out: used.append(out[1].clone()))
    model.zero_grad()
    with replay.replaying(trace):
        got, _ = megatron_logprobs(model, ids, mask)
    hook.remove()
    want_map = torch.zeros(t * b, 8, dtype=torch.bool).scatter(
        1, recorded[:, :, 0].transpose(0, 1).reshape(t * b, -1), True)
    assert torch.equal(used[0], want_map)  # exactly the recorded experts
    group = patch(hf)
    with group.replaying(trace):
        ref, _ = sequence_logprobs(hf, ids, mask)
    m = scored(mask)
    d = (got - ref)[m].abs().max().item()
    assert d <= ATOL, f"replayed max |Δ logp| = {d:.3g}"
    got[m].sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    RouterReplay.clear_global_router_replay_action()

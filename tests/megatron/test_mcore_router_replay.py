"""megatron-core's native routing replay (``moe_enable_routing_replay``): the top-k experts
recorded in one forward are the ones used when replayed in the next, even after the router
weights change so that free routing would pick others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.megatron._worker import batch, tiny_hf_policy

pytestmark = pytest.mark.megatron


@pytest.mark.usefixtures("megatron_cpu")
def test_record_then_replay_reproduces_routing(tmp_path: Path) -> None:
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.logprobs import megatron_logprobs
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel

    hf = tiny_hf_policy()
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg, routing_replay=True)
        load_hf_weights(model, hf.state_dict(), hf.config)
        model.eval()
        routers = [layer.mlp.router for layer in model.decoder.layers]
        assert len(RouterReplay.global_router_replay_instances) == len(routers) == 2
        used: list[torch.Tensor] = []  # routing_map [tokens, experts] of each router call
        hooks = [r.register_forward_hook(lambda _m, _i, out: used.append(out[1].clone()))
                 for r in routers]
        ids, mask = batch()

        def forward() -> tuple[torch.Tensor, list[torch.Tensor]]:
            used.clear()
            with torch.no_grad():
                logp, _ = megatron_logprobs(model, ids, mask)
            return logp, [m.clone() for m in used]

        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
        logp_rec, maps_rec = forward()
        recorded = [t.clone() for t in RouterReplay.get_recorded_data()]
        assert all(t.shape == (ids.numel(), 2) for t in recorded)  # [tokens, top_k]

        # The record names the experts HF picks (tokens are [s, b]-major in megatron, [b, s]
        # in HF); compared on real tokens, as R3 replays the engine's choice per token.
        hf_idx: list[torch.Tensor] = []
        hf_hooks = [layer.mlp.gate.register_forward_hook(
            lambda _m, _i, out: hf_idx.append(out[2])) for layer in hf.model.layers]
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=mask)
        for h in hf_hooks:
            h.remove()
        b, t = ids.shape
        real = mask.bool()
        for ours, theirs in zip(recorded, hf_idx, strict=True):
            ours_bs = ours.view(t, b, -1).transpose(0, 1)
            theirs_bs = theirs.view(b, t, -1)
            assert torch.equal(ours_bs.sort(-1).values[real], theirs_bs.sort(-1).values[real])
        for idx, rmap in zip(recorded, maps_rec, strict=True):  # the record is what was used
            assert torch.equal(torch.zeros_like(rmap).scatter(1, idx, True), rmap)

        # Perturb every router: free routing now differs from the record.
        with torch.no_grad():
            for r in routers:
                r.weight.add_(torch.randn(r.weight.shape, generator=torch.Generator().manual_seed(5)))
        RouterReplay.clear_global_router_replay_action()
        _, maps_free = forward()
        assert any(not torch.equal(a, b) for a, b in zip(maps_free, maps_rec, strict=True))

        # Replay: exactly the recorded experts, in every layer.
        RouterReplay.set_replay_data(recorded)
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        _, maps_replay = forward()
        for a, b in zip(maps_replay, maps_rec, strict=True):
            assert torch.equal(a, b)
        for h in hooks:
            h.remove()
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        assert torch.isfinite(logp_rec).all()
    finally:
        destroy_parallel()

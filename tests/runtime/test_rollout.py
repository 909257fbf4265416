"""Rollout engine, HTTP server and client (vLLM API subset) on a tiny Qwen3-MoE."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from runtime.rollout.client import RolloutClient, RolloutError
from runtime.rollout.engine import EngineError, LocalEngine
from runtime.rollout.protocol import CompletionRequest, ProtocolError
from runtime.rollout.request_time import DECODE_FLOOR_TOKENS_PER_S, request_limit_s
from runtime.rollout.server import check_host
from runtime.rollout.stall import generated_tokens
from runtime.rollout.weight_transfer import DiskWeightTransfer, NCCLWeightTransfer
from runtime.router_replay import align_routing, patch_qwen3_moe
from tests.helpers import rollout_servers
from tests.runtime.engine_probes import MIXED_PROMPTS as PROMPTS
from tests.runtime.engine_probes import (
    StubHandler,
    canned_server,
    full_logprobs,
    in_flight,
    post_json,
    stub_server,
)
from tests.runtime.tiny_moe import EOS, VOCAB

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def engine(model_dir: Path) -> LocalEngine:
    return LocalEngine(model_dir, seed=0)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> torch.nn.Module:
    """A second, independent model instance: the 'training' side."""
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


# ------------------------------------------------------------------------------ engine


def test_engine_logprobs_match_uncached_forward(
    engine: LocalEngine, reference: torch.nn.Module
) -> None:
    # Prompts of different lengths share one left-padded, KV-cached batch; the raw
    # logprobs are the model's own (temperature 1), whatever the sampling filters.
    for sampling in (dict(temperature=1.0), dict(temperature=0.7, top_k=8, top_p=0.9)):
        outs = engine.generate(PROMPTS, n=2, max_tokens=10, seed=3, ignore_eos=True, **sampling)
        assert [o.prompt_token_ids for o in outs] == PROMPTS
        for o in outs:
            assert len(o.samples) == 2
            for s in o.samples:
                assert len(s.token_ids) == 10 and s.finish_reason == "length"
                assert s.logprobs.dtype == np.float32
                ref = full_logprobs(reference, o.prompt_token_ids, s.token_ids)
                np.testing.assert_allclose(s.logprobs, ref, atol=1e-4, rtol=0)


def test_processed_logprobs_are_the_sampling_distribution(
    model_dir: Path, reference: torch.nn.Module
) -> None:
    eng = LocalEngine(model_dir, seed=0, logprobs_mode="processed_logprobs")
    temperature, top_k = 0.7, 5
    outs = eng.generate(
        PROMPTS[:2],
        n=3,
        max_tokens=6,
        temperature=temperature,
        top_k=top_k,
        seed=1,
        ignore_eos=True,
    )
    for o in outs:
        for s in o.samples:
            ids = torch.tensor([o.prompt_token_ids + s.token_ids[:-1]])
            with torch.inference_mode():
                logits = (
                    reference(input_ids=ids).logits[0, len(o.prompt_token_ids) - 1 :].float()
                    / temperature
                )
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            processed = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
            picked = processed.gather(1, torch.tensor(s.token_ids)[:, None]).squeeze(1)
            assert torch.isfinite(picked).all()  # every sampled token is inside the top-k
            np.testing.assert_allclose(s.logprobs, picked.numpy(), atol=1e-4, rtol=0)


def test_top_p_samples_from_the_renormalised_nucleus(
    model_dir: Path, reference: torch.nn.Module
) -> None:
    """top_p 0.3: every sampled token lies in the nucleus (vLLM's rule: ascending sort, drop
    the tokens whose cumulative mass is ≤ 1 − p, keep the top one), and its processed
    log-prob is that of the renormalised nucleus, which excludes tokens at every step."""
    eng = LocalEngine(model_dir, seed=0, logprobs_mode="processed_logprobs")
    top_p = 0.3
    outs = eng.generate(PROMPTS[:2], n=3, max_tokens=6, temperature=1.0, top_p=top_p, seed=1,
                        ignore_eos=True)
    for o in outs:
        for s in o.samples:
            ids = torch.tensor([o.prompt_token_ids + s.token_ids[:-1]])
            with torch.inference_mode():
                logits = reference(input_ids=ids).logits[0, len(o.prompt_token_ids) - 1 :].float()
            srt, order = logits.sort(dim=-1)
            drop = srt.softmax(-1).cumsum(-1) <= 1.0 - top_p
            drop[:, -1] = False
            assert drop.any(dim=-1).all()  # the nucleus is a strict subset at every step
            nucleus = srt.masked_fill(drop, float("-inf"))
            processed = torch.log_softmax(torch.empty_like(nucleus).scatter(-1, order, nucleus),
                                          dim=-1)
            picked = processed.gather(1, torch.tensor(s.token_ids)[:, None]).squeeze(1)
            assert torch.isfinite(picked).all()  # every sampled token is in the nucleus
            np.testing.assert_allclose(s.logprobs, picked.numpy(), atol=1e-4, rtol=0)


def test_greedy_takes_the_argmax(engine: LocalEngine, reference: torch.nn.Module) -> None:
    outs = engine.generate(PROMPTS[1:3], max_tokens=6, temperature=0.0, ignore_eos=True)
    for o in outs:
        s = o.samples[0]
        ids = torch.tensor([o.prompt_token_ids + s.token_ids[:-1]])
        with torch.inference_mode():
            logits = reference(input_ids=ids).logits[0, len(o.prompt_token_ids) - 1 :]
        assert s.token_ids == logits.argmax(-1).tolist()


def test_seeded_sampling_is_deterministic_and_batch_invariant(
    engine: LocalEngine, model_dir: Path
) -> None:
    def tokens(outs: list) -> list[list[int]]:
        return [s.token_ids for o in outs for s in o.samples]

    kw = dict(n=3, max_tokens=8, temperature=1.0, ignore_eos=True)
    a = engine.generate(PROMPTS, seed=123, **kw)
    b = engine.generate(PROMPTS, seed=123, **kw)
    assert tokens(a) == tokens(b)
    for x, y in zip(a, b, strict=True):
        for s, t in zip(x.samples, y.samples, strict=True):
            np.testing.assert_array_equal(s.logprobs, t.logprobs)
    assert tokens(engine.generate(PROMPTS, seed=124, **kw)) != tokens(a)
    # A prompt sampled alone gets the same tokens as inside the batch (seed + j per sample).
    alone = engine.generate([PROMPTS[2]], seed=123, **kw)
    assert tokens(alone) == [s.token_ids for s in a[2].samples]
    # The n samples of a prompt differ; unseeded requests differ from call to call but
    # replay exactly on a fresh engine with the same engine seed.
    assert len({tuple(t) for t in tokens(alone)}) == 3
    u1, u2 = engine.generate(PROMPTS, **kw), engine.generate(PROMPTS, **kw)
    assert tokens(u1) != tokens(u2)
    e1, e2 = LocalEngine(model_dir, seed=0), LocalEngine(model_dir, seed=0)
    assert tokens(e1.generate(PROMPTS, **kw)) == tokens(e2.generate(PROMPTS, **kw))


def test_stop_tokens_eos_and_max_tokens(engine: LocalEngine) -> None:
    stops = [19, 25, 33, 34, 44]  # frequent tokens of this model: both outcomes occur
    outs = engine.generate(
        PROMPTS, n=4, max_tokens=5, seed=7, stop_token_ids=stops, ignore_eos=True
    )
    reasons = []
    for o in outs:
        for s in o.samples:
            reasons.append(s.finish_reason)
            if s.finish_reason == "stop":
                assert s.token_ids[-1] in stops and s.stop_reason == s.token_ids[-1]
                assert not set(s.token_ids[:-1]) & set(stops)
            else:
                assert (
                    s.finish_reason == "length" and len(s.token_ids) == 5 and s.stop_reason is None
                )
                assert not set(s.token_ids) & set(stops)
            assert len(s.logprobs) == len(s.token_ids)
    assert {"stop", "length"} <= set(reasons)

    # EOS ends a sample with stop_reason None unless ignore_eos; it is kept in the output.
    outs = engine.generate(PROMPTS, n=8, max_tokens=40, seed=3)
    ended = [s for o in outs for s in o.samples if s.token_ids[-1] == EOS]
    assert ended, "no sample produced EOS; pick another seed"
    for s in (s for o in outs for s in o.samples):
        assert EOS not in s.token_ids[:-1]
        if s.token_ids[-1] == EOS:
            assert s.finish_reason == "stop" and s.stop_reason is None
        else:
            assert s.finish_reason == "length" and len(s.token_ids) == 40

    # max_tokens is capped by the context (max_position_embeddings = 256).
    long = engine.generate(
        [list(range(1, 60)) * 4 + [3] * 14], max_tokens=50, seed=0, ignore_eos=True
    )
    assert (
        len(long[0].samples[0].token_ids) == 256 - 250
        and long[0].samples[0].finish_reason == "length"
    )


def test_routed_experts_are_the_training_models_experts(
    engine: LocalEngine, model_dir: Path
) -> None:
    outs = engine.generate(
        PROMPTS, n=2, max_tokens=7, seed=11, return_routed_experts=True, ignore_eos=True
    )
    train = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    group = patch_qwen3_moe(train)
    for o in outs:
        prompt = o.prompt_token_ids
        for s in o.samples:
            full = prompt + s.token_ids
            routed = s.routed_experts
            assert routed is not None and routed.dtype == np.uint8
            assert routed.shape == (len(full) - 1, 2, 2)  # (num_tokens − 1, moe_layers, top_k)
            with torch.inference_mode(), group.recording() as rec:
                train(input_ids=torch.tensor([full[:-1]]))
            np.testing.assert_array_equal(rec.trace.ids.numpy(), routed)
            # Replaying the engine's experts (R3) reproduces the training forward.
            trace = align_routing(
                routed, prompt_len=len(prompt), response_len=len(s.token_ids), num_experts=8
            )
            ids = torch.tensor([full])
            with torch.inference_mode():
                live = train(input_ids=ids).logits
                with group.replaying(trace):
                    replayed = train(input_ids=ids).logits
            torch.testing.assert_close(replayed, live, atol=0, rtol=0)
            logp = torch.log_softmax(replayed[0, len(prompt) - 1 : -1].float(), -1)
            picked = logp.gather(1, torch.tensor(s.token_ids)[:, None]).squeeze(1).numpy()
            np.testing.assert_allclose(picked, s.logprobs, atol=1e-4, rtol=0)
    # routed_experts_prompt_start drops leading prompt rows only.
    tail = engine.generate(PROMPTS[2:3], n=2, max_tokens=7, seed=11, return_routed_experts=True,
                           ignore_eos=True, routed_experts_prompt_start=4)  # fmt: skip
    for s, t in zip(outs[2].samples, tail[0].samples, strict=True):
        assert t.routed_experts is not None and s.routed_experts is not None
        np.testing.assert_array_equal(t.routed_experts, s.routed_experts[4:])


def test_pause_abort_and_keep_with_a_weight_swap(model_dir: Path, other_weights: Path) -> None:
    eng = LocalEngine(model_dir, seed=0)
    kw = dict(prompts=[[3, 4, 5]], n=4, max_tokens=250, seed=0, ignore_eos=True)
    # abort: the in-flight generation returns early with finish_reason "abort".
    t, out = in_flight(eng, **kw)
    eng.pause("abort")
    t.join(timeout=30)
    samples = out[0][0].samples
    assert all(s.finish_reason == "abort" and len(s.token_ids) < 250 for s in samples)
    assert all(len(s.logprobs) == len(s.token_ids) for s in samples)
    eng.resume()
    # keep: the generation freezes between two tokens; the weights are swapped under
    # it, and after resume it finishes on the new weights, reporting both versions.
    t, out = in_flight(eng, **kw)
    eng.pause("keep")
    eng.load_weights(other_weights, "step-1")
    eng.resume()
    t.join(timeout=60)
    for s in out[0][0].samples:
        assert s.finish_reason == "length" and len(s.token_ids) == 250
        (v0, a0, b0), (v1, a1, b1) = [(w.weight_version, w.start, w.end) for w in s.weight_versions]
        assert (v0, a0, v1, b1) == ("default", 0, "step-1", 250) and 0 < b0 == a1 < 250
        assert s.weight_version == "default"  # the oldest version bounds staleness


def test_engine_rejects_bad_input(engine: LocalEngine) -> None:
    with pytest.raises(EngineError, match="outside"):
        engine.generate([[1, VOCAB]])
    with pytest.raises(EngineError, match="empty"):
        engine.generate([[]])
    with pytest.raises(EngineError, match="routed_experts_prompt_start"):
        engine.generate([[1, 2]], routed_experts_prompt_start=2, return_routed_experts=True)
    with pytest.raises(EngineError, match="maximum context"):
        engine.generate([[1] * 256])
    with pytest.raises(ProtocolError, match="top_p"):
        CompletionRequest.from_json({"prompt": [1], "top_p": 0})
    with pytest.raises(ProtocolError, match="stream"):
        CompletionRequest.from_json({"prompt": [1], "stream": True})


# ------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    logs = tmp_path_factory.mktemp("server_logs")
    with rollout_servers(model_dir, logs, 2, "--return-routed-experts") as urls:
        yield urls


@pytest.fixture(scope="module")
def client(servers: list[str]) -> Iterator[RolloutClient]:
    c = RolloutClient(servers, timeout_s=60, retries=1, backoff_s=0.05)
    c.wait_ready(timeout=30)
    yield c
    c.close()


def test_http_generate_matches_the_engine(
    client: RolloutClient, engine: LocalEngine, servers: list[str]
) -> None:
    prompts = [*PROMPTS, [7, 7, 7, 7, 7]]
    sampling = {"max_tokens": 6, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    got = client.generate(prompts, n=3, sampling=sampling, return_routed_experts=True)
    assert len(got) == len(prompts) and all(len(row) == 3 for row in got)
    assert {c.endpoint for row in got for c in row} == set(servers)  # spread over both
    want = engine.generate(prompts, n=3, max_tokens=6, temperature=1.0, seed=11, ignore_eos=True,
                           return_routed_experts=True)  # fmt: skip
    for prompt, row, ref in zip(prompts, got, want, strict=True):
        for c, s in zip(row, ref.samples, strict=True):
            assert c.prompt_ids == prompt and c.token_ids == s.token_ids
            assert c.finish_reason == "length" and c.weight_version == "default"
            assert c.logprobs.dtype == np.float32
            np.testing.assert_allclose(c.logprobs, s.logprobs, atol=1e-5, rtol=0)
            assert c.routed_experts is not None
            assert c.routed_experts.shape == (len(prompt) + 6 - 1, 2, 2)
            np.testing.assert_array_equal(c.routed_experts, s.routed_experts)
    # routed_experts_prompt_start goes over the wire too; stop tokens come back.
    tail = client.generate([PROMPTS[2]], n=2, sampling={**sampling, "stop_token_ids": [30]},
                           return_routed_experts=True, routed_experts_prompt_start=3)  # fmt: skip
    for c in tail[0]:
        assert c.routed_experts is not None
        assert c.routed_experts.shape[0] == len(PROMPTS[2]) + len(c.token_ids) - 1 - 3
        assert (c.finish_reason, c.stop_reason) in {("stop", 30), ("length", None)}


def test_generate_on_one_endpoint_reports_each_request(client: RolloutClient,
                                                       servers: list[str]) -> None:
    """``endpoint=i`` sends every prompt to endpoint i (the driver's length balancing);
    ``on_request`` gets each request's (endpoint, start, finish)."""
    from runtime.rollout.replica_time import RequestLog

    log = RequestLog()
    got = client.generate(PROMPTS, n=2, sampling={"max_tokens": 3}, endpoint=1, on_request=log)
    assert {c.endpoint for row in got for c in row} == {servers[1]}
    assert [e for e, _, _ in log.events] == [servers[1]]  # one request: all prompts fit one
    assert all(finish >= start for _, start, finish in log.events)
    busy = log.busy(servers)
    assert busy[0] == 0 and busy[1] > 0
    with pytest.raises(ValueError, match="endpoint 2 is not one of the 2"):
        client.generate(PROMPTS, endpoint=2)


def test_http_weight_update_changes_outputs_and_version(
    client: RolloutClient, model_dir: Path, other_weights: Path
) -> None:
    sampling = {"max_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    before = client.generate(PROMPTS, n=2, sampling=sampling)
    assert client.weight_info() == ["default", "default"]
    try:
        client.update_weights(str(other_weights), "step-1")
        assert client.weight_info() == ["step-1", "step-1"]
        after = client.generate(PROMPTS, n=2, sampling=sampling)
        assert all(c.weight_version == "step-1" for row in after for c in row)
        assert [c.token_ids for row in after for c in row] != [
            c.token_ids for row in before for c in row
        ]
        # The servers now sample exactly what the new checkpoint samples in-process.
        reloaded = LocalEngine(other_weights, seed=0)
        want = reloaded.generate(PROMPTS, n=2, max_tokens=8, seed=5, ignore_eos=True)
        assert [c.token_ids for row in after for c in row] == [
            s.token_ids for o in want for s in o.samples
        ]
    finally:
        client.update_weights(str(model_dir), "default")
    again = client.generate(PROMPTS, n=2, sampling=sampling)
    assert [c.token_ids for row in again for c in row] == [
        c.token_ids for row in before for c in row
    ]


def test_vllm_disk_reload_through_collective_rpc(
    client: RolloutClient, model_dir: Path, other_weights: Path
) -> None:
    """weight_sync disk against vLLM: pause → /collective_rpc reload_weights(weights_path) →
    /update_weight_version → resume, which the embedded server answers as vLLM 0.33 does."""
    sampling = {"max_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    before = client.generate(PROMPTS, n=2, sampling=sampling)
    transfer = DiskWeightTransfer("vllm")
    try:
        transfer.push(client, "rpc-1", path=str(other_weights))
        assert client.weight_info() == ["rpc-1", "rpc-1"]
        after = client.generate(PROMPTS, n=2, sampling=sampling)
        want = LocalEngine(other_weights, seed=0).generate(
            PROMPTS, n=2, max_tokens=8, seed=5, ignore_eos=True)
        assert [c.token_ids for row in after for c in row] == [
            s.token_ids for o in want for s in o.samples
        ]
        assert all(c.weight_version == "rpc-1" for row in after for c in row)
    finally:
        DiskWeightTransfer("local").push(client, "default", path=str(model_dir))
    again = client.generate(PROMPTS, n=2, sampling=sampling)
    assert [c.token_ids for row in again for c in row] == [
        c.token_ids for row in before for c in row
    ]
    # A failed reload leaves the version alone and the endpoints resumed.
    with pytest.raises(RolloutError) as info:
        transfer.push(client, "rpc-2", path=str(model_dir / "nope"))
    assert info.value.status == 400
    assert client.weight_info() == ["default", "default"]
    assert client.generate([[1, 2]], sampling={"max_tokens": 2})[0][0].token_ids


def test_http_weight_transfer_engine_routes(servers: list[str], client: RolloutClient) -> None:
    url = servers[0]
    assert client.world_sizes() == [1, 1]
    # The disk backend has no rendezvous: empty init_info only, answered as vLLM does.
    client.init_weight_transfer_engine([{}, {}])
    assert post_json(url + "/init_weight_transfer_engine", {"init_info": {}}) == (
        200, {"message": "Weight transfer initialized"})
    code, body = post_json(url + "/init_weight_transfer_engine", {})
    assert code == 400 and body["error"]["param"] == "body.init_info"
    # NCCL init info sent to the embedded server by mistake is refused, not ignored.
    infos = NCCLWeightTransfer("127.0.0.1", 29650).init_infos(client.world_sizes())
    with pytest.raises(RolloutError) as info:
        client.init_weight_transfer_engine(infos)
    assert info.value.status == 400 and "disk" in str(info.value)
    with pytest.raises(ValueError, match="one init_info per endpoint"):
        client.init_weight_transfer_engine([{}])
    code, body = post_json(url + "/collective_rpc", {"method": "sleep"})
    assert code == 501 and "not implemented" in body["error"]["message"]
    code, body = post_json(url + "/collective_rpc", {"args": []})
    assert code == 400 and body["error"]["param"] == "body.method"
    code, body = post_json(url + "/collective_rpc",
                       {"method": "reload_weights", "kwargs": {"weights_iterator": "x"}})
    assert code == 400 and body["error"]["param"] == "body.kwargs"


def test_http_errors_are_vllm_shaped(servers: list[str], client: RolloutClient) -> None:
    url = servers[0]
    cases = [
        (dict(raw=b"{not json"), 400, "body"),
        (dict(body={"prompt": "hello"}), 400, "prompt"),
        (dict(body={"prompt": [[1, 2], [3, -1]]}), 400, "prompt"),
        (dict(body={"prompt": [1, 2], "n": 0}), 400, "n"),
        (dict(body={"prompt": [1, 2], "max_tokens": "8"}), 400, "max_tokens"),
        (dict(body={"prompt": [1, 2], "stream": True}), 400, "stream"),
        (dict(body={"prompt": [1, VOCAB + 5]}), 400, None),
        (dict(body={"prompt": [1, 2], "model": "other"}), 404, "model"),
    ]
    for kwargs, status, param in cases:
        code, body = post_json(url + "/v1/completions", kwargs.get("body"), kwargs.get("raw"))
        assert code == status, (kwargs, body)
        err = body["error"]
        assert err["code"] == status and isinstance(err["message"], str) and err["message"]
        assert err["type"] == ("BadRequestError" if status == 400 else "NotFoundError")
        assert err["param"] == param
    assert post_json(url + "/no_such_route", {})[0] == 404
    assert post_json(url + "/update_weights", {"update_info": {"path": "/nope"}})[0] == 409
    code, body = post_json(url + "/update_weight_version", {"weight_version": "x"})
    assert code == 400 and body["error"]["param"] == "body.new_version"
    code, body = post_json(url + "/pause?mode=sideways", {})
    assert code == 400 and body["error"]["param"] == "query.mode"
    with pytest.raises(RolloutError) as info:
        client.generate([[1, 2]], sampling={"top_p": 0.0})
    assert info.value.status == 400
    with pytest.raises(ValueError, match="unsupported sampling keys"):
        client.generate([[1, 2]], sampling={"temprature": 1.0})
    # The server still serves after all of that.
    assert client.generate([[1, 2]], sampling={"max_tokens": 2})[0][0].token_ids


def test_http_pause_holds_new_requests_until_resume(servers: list[str]) -> None:
    c = RolloutClient(servers[:1], timeout_s=60, retries=0)
    c.wait_ready(timeout=30)
    c.pause("wait")
    try:
        with urllib.request.urlopen(servers[0] + "/is_paused", timeout=10) as r:
            assert json.loads(r.read()) == {"is_paused": True}
        result: list = []
        t = threading.Thread(
            target=lambda: result.append(c.generate([[1, 2, 3]], sampling={"max_tokens": 3}))
        )
        t.start()
        t.join(timeout=0.5)
        assert t.is_alive() and not result  # waiting, not refused
    finally:
        c.resume()
    t.join(timeout=30)
    assert result and len(result[0][0][0].token_ids) >= 1
    c.close()


def test_prompt_logprobs_are_the_teacher_forced_logprobs_in_vllms_format(
    client: RolloutClient, reference: torch.nn.Module, servers: list[str]
) -> None:
    """``prompt_logprobs: 0`` (the weight-sync probe): each prompt token's log-prob given the
    tokens before it, as vLLM returns it (None first, then {"<id>": {logprob, rank,
    decoded_token}}), from every endpoint; top-k alternatives (> 0) are refused."""
    ids = [5, 9, 12, 20, 7, 33, 3]
    want = full_logprobs(reference, ids[:1], ids[1:])
    for got in client.prompt_logprobs(ids):
        np.testing.assert_allclose(got, want, atol=1e-5)
    body = {"prompt": [ids], "max_tokens": 1, "prompt_logprobs": 0, "return_token_ids": True}
    code, out = post_json(servers[0] + "/v1/completions", body)
    entries = out["choices"][0]["prompt_logprobs"]
    assert code == 200 and entries[0] is None and len(entries) == len(ids)
    for t, entry, lp in zip(ids[1:], entries[1:], want, strict=True):
        assert list(entry) == [str(t)] and set(entry[str(t)]) == {"logprob", "rank",
                                                                  "decoded_token"}
        assert entry[str(t)]["logprob"] == pytest.approx(float(lp), abs=1e-5)
        assert entry[str(t)]["rank"] >= 1
    code, out = post_json(servers[0] + "/v1/completions", {**body, "prompt_logprobs": 2})
    assert code == 400 and out["error"]["param"] == "prompt_logprobs"
    code, out = post_json(servers[0] + "/v1/completions", {"prompt": [ids], "max_tokens": 1})
    assert code == 200 and out["choices"][0]["prompt_logprobs"] is None


def test_a_dead_endpoint_costs_one_attempt_and_its_requests_fail_over(
    client: RolloutClient, servers: list[str]
) -> None:
    """A replica that died: its planned requests go to the live ones, with the same samples
    (seeded), and only the first request tries it; later ones skip it while it is down."""
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    sampling = {"max_tokens": 4, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    want = [[x.token_ids for x in row] for row in client.generate(PROMPTS, n=2, sampling=sampling)]
    attempts: list[str] = []
    with RolloutClient([dead, *servers], model=client.model, timeout_s=60, retries=2,
                       backoff_s=0.01) as c:
        for _ in range(2):  # 4 prompts over 3 endpoints: each call plans some for the dead one
            got = c.generate(PROMPTS, n=2, sampling=sampling,
                             on_request=lambda endpoint, *_: attempts.append(endpoint))
            assert [[x.token_ids for x in row] for row in got] == want
            assert {x.endpoint for row in got for x in row} <= set(servers)
    assert attempts.count(dead) == 1


def test_an_unusable_answer_is_retried_elsewhere_without_shunning_the_endpoint(
    client: RolloutClient, servers: list[str]
) -> None:
    """An endpoint that answers 200 with a body the client cannot use: the request goes to
    another endpoint, and the endpoint is not marked down (it is alive; a protocol or
    configuration problem is not a dead replica)."""
    with canned_server(b'{"choices": "none"}') as url, RolloutClient(
            [url, servers[0]], model=client.model, timeout_s=60, retries=1,
            backoff_s=0.01) as c:
        got = c.generate([[5, 9, 12]], sampling={"max_tokens": 2}, endpoint=0)
        assert got[0][0].endpoint == servers[0]
        assert not c._health.is_down(0)


def test_a_slow_endpoint_is_retried_elsewhere_but_a_hung_one_is_shunned(
    client: RolloutClient, servers: list[str]
) -> None:
    """No answer within the client's timeout: the request goes to another endpoint. An
    endpoint that still answers /health is slow, not dead: it is not marked down (its
    planned requests keep going to it); one that answers nothing is."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Stub(BaseHTTPRequestHandler):
        healthy = True

        def do_GET(self) -> None:
            if not self.healthy:
                release.wait()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:  # a generation that outlasts the client's timeout
            release.wait()

        def log_message(self, *args: object) -> None:
            pass

    for healthy in (True, False):
        Stub.healthy = healthy
        stub = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{stub.server_address[1]}"
        try:
            with RolloutClient([url, servers[0]], model=client.model, timeout_s=2.0, retries=1,
                               backoff_s=0.01) as c:
                got = c.generate([[5, 9, 12]], sampling={"max_tokens": 2}, endpoint=0)
                assert got[0][0].endpoint == servers[0]
                assert c._health.is_down(0) is not healthy
        finally:
            release.set()
            stub.shutdown()
            stub.server_close()
            release.clear()


def test_an_engine_that_stops_generating_is_cut_and_one_that_generates_is_not(
    client: RolloutClient, servers: list[str]
) -> None:
    """With stall_s, the client reads each busy endpoint's vLLM counter
    vllm:generation_tokens_total (runtime.rollout.stall). Requests in flight on an endpoint
    whose counter stands still for stall_s are cut long before their limit, retried
    elsewhere, and the endpoint is marked down. An endpoint whose counter moves keeps its
    request past stall_s, for as long as it needs (here it answers through a real server)."""
    release = threading.Event()

    class Stub(StubHandler):
        moving, reads = False, 0

        def do_GET(self) -> None:
            if self.path != "/metrics":
                return self.send(200)
            Stub.reads += 1
            if Stub.moving and Stub.reads >= 12:  # well past stall_s of reads
                release.set()
            count = Stub.reads if Stub.moving else 7
            self.send(200, ("# TYPE vllm:generation_tokens_total counter\n"
                            f'vllm:generation_tokens_total{{engine="0"}} {count}.0\n').encode())

        def do_POST(self) -> None:
            body = self.body()
            release.wait(120)
            req = urllib.request.Request(servers[0] + self.path, data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                self.send(resp.status, resp.read())

    with stub_server(Stub) as url:
        try:
            with RolloutClient([url, servers[0]], model=client.model, timeout_s=120,
                               retries=1, backoff_s=0.01, stall_s=0.5) as c:
                got = c.generate([[5, 9, 12]], sampling={"max_tokens": 2}, endpoint=0)
                assert got[0][0].endpoint == servers[0]  # cut on the stub, served elsewhere
                assert c._health.is_down(0)
            Stub.moving, Stub.reads = True, 0
            with RolloutClient([url], model=client.model, timeout_s=120, retries=0,
                               stall_s=0.5) as c:
                got = c.generate([[5, 9, 12]], sampling={"max_tokens": 2})
                assert got[0][0].endpoint == url and Stub.reads >= 12
        finally:
            release.set()
    assert generated_tokens('vllm:generation_tokens_total{engine="0",model_name="m"} 3.0\n'
                            'vllm:generation_tokens_total{engine="1",model_name="m"} 4.0\n'
                            "vllm:generation_tokens_created 1.7e9\n") == 7.0
    assert generated_tokens("vllm:num_requests_running 1.0\n") is None


def test_a_replica_that_stays_hung_is_cut_at_once_and_a_bad_reading_ends_no_watch() -> None:
    """An endpoint cut as stalled stays judged: its next requests, while its counter still
    stands where it stood, are cut at the first reading (not after another stall_s, which
    would cost every step of the run that much). A reading that raises does not end the
    watch for the rest of the run."""
    from runtime.rollout.stall import Stalled, StallWatch

    release = threading.Event()

    class Hung(StubHandler):
        def do_POST(self) -> None:
            self.body()
            release.wait(120)

    reads = {"n": 0}

    def read(endpoint: str) -> str:
        reads["n"] += 1
        if reads["n"] == 1:
            raise ValueError("a reading the watch cannot use")
        return 'vllm:generation_tokens_total{engine="0"} 7.0\n'

    watch = StallWatch(read, stall_s=0.5, poll_s=0.05)
    with stub_server(Hung) as url:
        try:
            with pytest.raises(Stalled):  # the first reading raised; the watch went on
                watch.post(url, "/v1/completions", b"{}", timeout=60)
            first = reads["n"]
            assert first >= 0.5 / 0.05  # it waited stall_s of still readings
            with pytest.raises(Stalled):
                watch.post(url, "/v1/completions", b"{}", timeout=60)
            assert reads["n"] - first <= 2  # cut at its first reading
        finally:
            watch.close()
            release.set()


def test_one_hung_core_of_a_replica_is_noticed_and_an_idle_one_is_not() -> None:
    """A replica of two data-parallel engine cores: core 0 decodes on while core 1's counter
    stands. Idle (running 0), core 1 is not judged and the request is answered; running
    requests, it is hung and the request is cut, though the replica's summed counter moves.
    A replica whose every counter stands is cut whatever its gauges say."""
    from runtime.rollout.stall import Stalled, StallWatch, engine_readings

    release = threading.Event()

    class Slow(StubHandler):
        def do_POST(self) -> None:
            self.body()
            release.wait(120)
            self.send(200, b"{}")

    state = {"reads": 0, "idle": True}

    def read(endpoint: str) -> str:
        state["reads"] += 1
        if state["idle"] and state["reads"] >= 20:  # 20 readings: well past stall_s
            release.set()
        return (f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {state["reads"]}.0\n'
                'vllm:generation_tokens_total{engine="1",model_name="m"} 7.0\n'
                'vllm:num_requests_running{engine="0",model_name="m"} 1.0\n'
                f'vllm:num_requests_running{{engine="1",model_name="m"}} {1 - state["idle"]}\n')

    watch = StallWatch(read, stall_s=0.3, poll_s=0.02)
    with stub_server(Slow) as url:
        try:
            status, _ = watch.post(url, "/v1/completions", b"{}", timeout=60)
            assert status == 200 and state["reads"] >= 20
            state["idle"] = False
            release.clear()
            with pytest.raises(Stalled):
                watch.post(url, "/v1/completions", b"{}", timeout=60)
        finally:
            watch.close()
            release.set()
    assert engine_readings(read(url)) == {"0": (float(state["reads"]), 1.0), "1": (7.0, 1.0)}
    assert engine_readings("vllm:generation_tokens_total 5.0\n") == {"": (5.0, None)}

    # An engine hung in its first step after idling: vLLM updates the gauge when a step ends,
    # so it still reports 0 running; the replica's counter standing still cuts it.
    def first_step(endpoint: str) -> str:
        return ('vllm:generation_tokens_total{engine="0",model_name="m"} 7.0\n'
                'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n')

    watch = StallWatch(first_step, stall_s=0.3, poll_s=0.02)
    release.clear()
    with stub_server(Slow) as url:
        try:
            with pytest.raises(Stalled):
                watch.post(url, "/v1/completions", b"{}", timeout=60)
        finally:
            watch.close()
            release.set()


def test_closing_the_client_cuts_the_requests_it_waits_on(client: RolloutClient) -> None:
    """A job that fails (or ends) closes its rollout client (JobContext.closing, run_job):
    requests still waiting on an engine are cut then, so that the process does not wait at
    exit, for as long as their limits allow (hours), for answers it will not read."""
    arrived, release = threading.Event(), threading.Event()

    class Busy(StubHandler):
        def do_GET(self) -> None:  # /metrics: a counter that moves (the engine is not hung)
            self.send(200, f"vllm:generation_tokens_total {time.monotonic()}\n".encode())

        def do_POST(self) -> None:
            self.body()
            arrived.set()
            release.wait(120)

    failed: list[BaseException] = []
    with stub_server(Busy) as url:
        c = RolloutClient([url], model=client.model, timeout_s=120, retries=0, stall_s=60)

        def generate() -> None:
            try:
                c.generate([[5, 9, 12]], sampling={"max_tokens": 2})
            except BaseException as exc:  # the test looks at it
                failed.append(exc)

        waiting = threading.Thread(target=generate)
        waiting.start()
        try:
            assert arrived.wait(60)
            c.close()
            waiting.join(60)
            assert not waiting.is_alive() and not release.is_set()
            assert len(failed) == 1 and isinstance(failed[0], RolloutError)
        finally:
            release.set()
            waiting.join(60)


def test_the_embedded_server_counts_the_tokens_it_generates(
    client: RolloutClient, servers: list[str]
) -> None:
    """Like vLLM, the embedded server's /metrics has vllm:generation_tokens_total, which grows
    by the tokens its requests generated: the stall watch judges it as it judges vLLM."""
    before = generated_tokens(client._metrics(servers[0]) or "")
    assert before is not None
    out = client.generate(PROMPTS, n=2, sampling={"max_tokens": 5, "seed": 1}, endpoint=0)
    made = sum(len(c.token_ids) for cs in out for c in cs)
    assert made > 0 and generated_tokens(client._metrics(servers[0]) or "") == before + made


def test_a_request_may_run_as_long_as_the_generation_it_asks_for(
    client: RolloutClient, servers: list[str]
) -> None:
    """A completion request's limit is the client's timeout plus its max_tokens at the decode
    floor for every wave of max_num_seqs sequences in flight on its endpoint, its own
    included (runtime.rollout.request_time): a long reasoning answer is not cut off at a
    fixed 600 s, and requests queued behind others get the waves ahead of them."""
    assert request_limit_s(600, 32768, 256, 256) == 600 + 32768 / DECODE_FLOOR_TOKENS_PER_S
    assert request_limit_s(600, 100, 257, 256, floor=10) == 620
    assert request_limit_s(600, 100, 0, 256, floor=10) == 610  # at least one wave
    with pytest.raises(ValueError):
        request_limit_s(600, 100, 1, 0)

    held = threading.Barrier(3, timeout=60)
    limits: list[float] = []
    with RolloutClient(servers[:1], model=client.model, timeout_s=7, retries=0,
                       max_num_seqs=4, decode_floor=2.0, max_prompts_per_request=1) as c:
        real = c._request

        def spy(endpoint: str, method: str, path: str, body: Any = None, **kw: Any) -> Any:
            if path == "/v1/completions":  # all three requests counted before any is sent
                limits.append(kw["timeout"])
                held.wait()
            return real(endpoint, method, path, body, **kw)

        c._request = spy  # type: ignore[method-assign]
        got = c.generate([[5, 9, 12], [7, 3], [4, 4, 4]], n=3, sampling={"max_tokens": 8})
    assert [len(g) for g in got] == [3, 3, 3]
    # 3, 6 and 9 sequences in flight → 1, 2 and 3 waves of 4 → 8/2 s each on top of 7 s
    assert sorted(limits) == [7 + 4, 7 + 8, 7 + 12]
    assert c._sequences == {servers[0]: 0}


def test_non_loopback_host_is_refused(model_dir: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        check_host(host)
    for host in ("0.0.0.0", "8.8.8.8", "::"):
        with pytest.raises(ValueError, match="loopback"):
            check_host(host)
    check_host("0.0.0.0", allow_non_loopback=True)  # the cluster case: checked, not bound
    r = subprocess.run(
        [sys.executable, "-m", "runtime.rollout.server", "--model", str(model_dir), "--host", "0.0.0.0",
         "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "loopback" in r.stderr and "serving on" not in r.stdout


def test_an_engine_serving_another_model_is_refused(servers: list[str], model_dir: Path,
                                                    other_weights: Path) -> None:
    """A stale engine of another run on the port is refused, not sampled from."""
    mine = RolloutClient(servers, timeout_s=30, retries=0)
    try:
        mine.wait_ready(timeout=30, model_root=str(model_dir))
        assert mine.model is not None
        with pytest.raises(RolloutError, match="another run's engine holds the port"):
            RolloutClient(servers, timeout_s=30, retries=0).wait_ready(
                timeout=30, model_root=str(other_weights))
    finally:
        mine.close()

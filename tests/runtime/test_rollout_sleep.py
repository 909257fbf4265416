"""Sleep mode of the embedded rollout engine and server (vLLM's ``/sleep``, ``/wake_up``,
``/is_sleeping``), as colocated placement drives it: sleep while the trainer steps, wake,
(after level 2) reload the weights, and sample exactly as before."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runtime.rollout.client import RolloutClient, RolloutError
from runtime.rollout.engine import EngineError, LocalEngine
from tests.helpers import rollout_servers
from tests.runtime.engine_probes import MIXED_PROMPTS as PROMPTS
from tests.runtime.engine_probes import in_flight, post_json

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = {"max_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True}


def _params(eng: LocalEngine) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in eng.model.named_parameters()}


def _stored_bytes(eng: LocalEngine) -> int:
    return sum(p.untyped_storage().nbytes() for p in eng.model.parameters())


def _tokens(eng: LocalEngine) -> list[list[int]]:
    outs = eng.generate(PROMPTS, n=2, max_tokens=8, seed=5, ignore_eos=True)
    return [s.token_ids for o in outs for s in o.samples]


# ------------------------------------------------------------------------------ engine


def test_level_1_releases_the_weights_and_wakes_to_the_same_fp8_weights(model_dir: Path) -> None:
    eng = LocalEngine(model_dir, seed=0, fp8=True, enable_sleep_mode=True)
    before, tokens = _params(eng), _tokens(eng)
    assert not eng.is_sleeping and _stored_bytes(eng) > 0
    eng.sleep(1)
    assert eng.is_sleeping and eng.sleeping_tags == {"weights", "kv_cache"}
    assert _stored_bytes(eng) == 0  # every parameter's storage is released
    with pytest.raises(EngineError, match="asleep") as info:
        eng.generate(PROMPTS, max_tokens=2)
    assert info.value.status == 503
    with pytest.raises(EngineError, match="wake_up") as info:
        eng.load_weights(model_dir)  # nothing to write into
    assert info.value.status == 409
    eng.sleep(2)  # already asleep: vLLM changes nothing (the weights stay offloaded)
    eng.wake_up(["weights"])
    assert eng.is_sleeping and eng.sleeping_tags == {"kv_cache"}
    with pytest.raises(EngineError, match="asleep"):
        eng.generate(PROMPTS, max_tokens=2)
    eng.wake_up(["kv_cache"])
    assert not eng.is_sleeping and not eng.is_paused
    after = _params(eng)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the rounded fp8 weights
    assert _tokens(eng) == tokens and eng.weight_version == "default"


def test_level_2_refuses_generation_until_the_weights_are_reloaded(model_dir: Path) -> None:
    eng = LocalEngine(model_dir, seed=0, fp8=True, enable_sleep_mode=True)
    before, tokens = _params(eng), _tokens(eng)
    eng.set_weight_version("step-3")
    # A keep-mode sleep freezes an in-flight generation; waking without a reload aborts it
    # rather than letting it sample from uninitialised weights.
    t, out = in_flight(eng, prompts=[[3, 4, 5]], n=2, max_tokens=250, seed=0, ignore_eos=True)
    eng.sleep(2, mode="keep")
    assert _stored_bytes(eng) == 0
    eng.wake_up()  # all tags, no reload: the forgotten-reload mistake
    t.join(timeout=60)
    assert all(s.finish_reason == "abort" for s in out[0][0].samples)
    assert not eng.is_sleeping
    with pytest.raises(EngineError, match="level-2") as info:
        eng.generate(PROMPTS, max_tokens=2)
    assert info.value.status == 409
    eng.load_weights(model_dir)
    after = _params(eng)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # fp8 rounding re-applied
    assert _tokens(eng) == tokens and eng.weight_version == "step-3"


def test_bad_sleep_arguments_are_refused(model_dir: Path) -> None:
    eng = LocalEngine(model_dir, seed=0, enable_sleep_mode=True)
    for level, mode in ((3, "abort"), (-1, "abort"), (1, "nap")):
        with pytest.raises(ValueError):
            eng.sleep(level, mode)
    with pytest.raises(ValueError, match="tags"):
        eng.wake_up(["gpu"])
    assert not eng.is_sleeping and _stored_bytes(eng) > 0
    eng.sleep(0)  # vLLM's level 0 only pauses: the weights stay
    assert eng.is_sleeping and eng.is_paused and _stored_bytes(eng) > 0
    eng.wake_up(["scheduling"])
    assert not eng.is_sleeping


def test_without_sleep_mode_only_level_0_is_allowed(model_dir: Path) -> None:
    # vLLM allots no releasable memory pool without --enable-sleep-mode: the engine says so
    # instead of "sleeping" with its memory still held.
    eng = LocalEngine(model_dir, seed=0)
    for level in (1, 2):
        with pytest.raises(EngineError, match="--enable-sleep-mode") as info:
            eng.sleep(level)
        assert info.value.status == 400
    assert not eng.is_sleeping and _stored_bytes(eng) > 0
    eng.sleep(0)  # pausing needs no memory pool
    assert eng.is_paused
    eng.wake_up()
    assert not eng.is_sleeping


# ------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with rollout_servers(model_dir, tmp_path_factory.mktemp("sleep_logs"), 2,
                         "--enable-sleep-mode") as urls:
        yield urls


@pytest.fixture(scope="module")
def client(servers: list[str]) -> Iterator[RolloutClient]:
    c = RolloutClient(servers, timeout_s=60, retries=0)
    c.wait_ready(timeout=30)
    yield c
    c.close()


def _sample(client: RolloutClient) -> list[list[int]]:
    return [c.token_ids for row in client.generate(PROMPTS, n=2, sampling=SAMPLING) for c in row]


def _get(url: str) -> object:
    import json

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_http_level_1_sleep_and_wake(client: RolloutClient, servers: list[str]) -> None:
    tokens = _sample(client)
    assert client.is_sleeping() == [False, False]
    client.sleep(1)
    assert client.is_sleeping() == [True, True]
    assert _get(servers[0] + "/is_sleeping") == {"is_sleeping": True}
    with pytest.raises(RolloutError, match="asleep") as info:
        client.generate(PROMPTS, sampling=SAMPLING)
    assert info.value.status == 503
    code, body = post_json(servers[0] + "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2})
    assert code == 503 and "asleep" in body["error"]["message"]  # OpenAI-style error body
    client.wake_up(["weights", "kv_cache"])  # repeated ?tags= parameters
    assert client.is_sleeping() == [False, False]
    assert _sample(client) == tokens


def test_http_level_2_wake_reload_wake(client: RolloutClient, servers: list[str],
                                       model_dir: Path) -> None:
    tokens = _sample(client)
    # The forgotten reload: woken whole, the engines refuse to sample garbage.
    client.sleep(2, mode="wait")
    client.wake_up()
    assert client.is_sleeping() == [False, False]
    with pytest.raises(RolloutError, match="level-2") as info:
        client.generate(PROMPTS, sampling=SAMPLING)
    assert info.value.status == 409
    # The colocated driver's sequence: weights, reload from the checkpoint folder, KV cache.
    client.sleep(2)
    url = servers[0]
    assert post_json(url + "/start_weight_update", {})[0] == 200
    code, body = post_json(url + "/update_weights", {"update_info": {"path": str(model_dir)}})
    assert code == 409 and "wake_up" in body["error"]["message"]  # the weights are asleep
    assert post_json(url + "/finish_weight_update", {})[0] == 200
    client.wake_up(["weights"])
    assert client.is_sleeping() == [True, True]  # the KV cache still sleeps
    with pytest.raises(RolloutError, match="asleep"):
        client.generate(PROMPTS, sampling=SAMPLING)
    client.reload_weights(str(model_dir), "step-2", pause_mode=None)
    client.wake_up(["kv_cache"])
    assert client.is_sleeping() == [False, False]
    assert client.weight_info() == ["step-2", "step-2"]
    assert _sample(client) == tokens
    client.update_weight_version("default")


def test_http_weight_load_while_asleep_is_refused(client: RolloutClient, model_dir: Path) -> None:
    client.sleep(1)
    try:
        with pytest.raises(RolloutError, match="wake_up") as info:
            client.reload_weights(str(model_dir), "x", pause_mode=None)
        assert info.value.status == 409
    finally:
        client.wake_up()
    assert client.weight_info() == ["default", "default"]


def test_http_bad_sleep_parameters(client: RolloutClient, servers: list[str]) -> None:
    url = servers[0]
    for query, param in (("level=3", "query.level"), ("level=one", "query.level"),
                         ("mode=nap", "query.mode")):  # fmt: skip
        code, body = post_json(f"{url}/sleep?{query}", None, raw=b"")
        assert code == 400 and body["error"]["param"] == param, query
    code, body = post_json(f"{url}/wake_up?tags=weights&tags=gpu", None, raw=b"")
    assert code == 400 and body["error"]["param"] == "query.tags"
    code, _ = post_json(f"{url}/is_sleeping", None, raw=b"")
    assert code == 405
    with pytest.raises(ValueError):
        client.sleep(level=3)
    with pytest.raises(ValueError):
        client.sleep(mode="nap")
    assert client.is_sleeping() == [False, False]
    # vLLM's defaults: level 1, mode abort; empty 200 answers.
    req = urllib.request.Request(f"{url}/sleep", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and r.read() == b""
    assert client.is_sleeping() == [True, False]
    client.wake_up()
    assert client.is_sleeping() == [False, False]

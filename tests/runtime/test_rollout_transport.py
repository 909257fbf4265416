"""The rollout client's transport: what reaches the engines, and how."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from runtime.rollout.client import RolloutClient
from runtime.rollout.protocol import CompletionRequest
from tests.runtime.engine_probes import canned_server


@pytest.fixture
def engine() -> Iterator[str]:
    with canned_server(json.dumps({"weight_version": "7"}).encode()) as url:
        yield url


def test_the_engines_are_reached_directly_whatever_http_proxy_says(
        engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch hands the job the submitting shell's http_proxy; the engines are cluster nodes
    a login-node proxy does not reach (the http judge keeps the proxy: it is outside)."""
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens: a proxy would fail
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    client = RolloutClient([engine], timeout_s=10, retries=0)
    try:
        assert client._request(engine, "GET", "/weight_info") == {"weight_version": "7"}
    finally:
        client.close()


def test_every_completion_asks_vllm_for_its_weight_versions() -> None:
    """vLLM 0.33 stamps a choice's weight_versions only when asked."""
    body = CompletionRequest(prompt=[[1, 2]], max_tokens=4).to_json()
    assert body["return_weight_versions"] is True


def test_the_served_jobs_take_the_rollout_timeouts_of_the_run(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """screen and eval on vLLM wait as the RL job does: system.startup_timeout_s for the
    engines, RLSPEC_ROLLOUT_TIMEOUT per request (it was a fixed 600 s there) on top of the
    decode time of rollout.max_num_seqs-sized waves (the client's request_time), and as the
    time a busy engine may generate nothing before its requests are cut (stall)."""
    from pathlib import Path

    from compiler.api import compile_spec
    from compiler.bundle import write_bundle
    from runtime.jobs.common import JobContext
    from runtime.jobs.sampled import open_engine
    from runtime.rollout import remote

    seen: dict[str, float] = {}

    class Client:
        def __init__(self, endpoints: list[str], *, timeout_s: float,
                     max_num_seqs: int, stall_s: float, on_stall: Any) -> None:
            seen["request"], seen["max_num_seqs"] = timeout_s, max_num_seqs
            seen["stall"] = stall_s
            on_stall("http://127.0.0.1:9", 600.0)  # the job's log hears of a cut

        def wait_ready(self, timeout: float, model_root: str) -> None:
            seen["startup"] = timeout

    monkeypatch.setattr(remote, "RolloutClient", Client)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda path: None)
    monkeypatch.setenv("RLSPEC_ROLLOUT_ENDPOINTS", "http://127.0.0.1:9")
    monkeypatch.setenv("RLSPEC_ROLLOUT_TIMEOUT", "5400")
    monkeypatch.delenv("RLSPEC_STARTUP_TIMEOUT", raising=False)
    spec = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "spec.yaml"
    bundle = write_bundle(compile_spec(spec, ["rollout.engine=vllm", "rollout.max_num_seqs=64",
                                              "system.startup_timeout_s=120"]).files,
                          tmp_path / "b")
    ctx = JobContext.load(bundle / "jobs" / "eval_before" / "config.json", run_dir=tmp_path,
                          log_to_file=False)
    engine = open_engine(ctx, tmp_path, seed=0)
    assert "engine http://127.0.0.1:9 generated no token for 600 s" in capfd.readouterr().err
    assert seen == {"request": 5400.0, "startup": 120.0, "max_num_seqs": 64, "stall": 5400.0}
    assert engine.batch_sequences == 64  # one replica's batch per call (sampled.call_sequences)


def test_an_engine_runs_as_many_sequences_as_its_kv_cache_holds(tmp_path) -> None:
    """The request limits count waves of what a replica really runs at once: the 245B
    example's replica holds 66 full-length (32k) sequences in its KV cache, not its
    max_num_seqs 256, and half as many of the eval jobs' 64k; without an estimate (a CPU
    run) it is rollout.max_num_seqs."""
    from pathlib import Path

    from runtime.jobs.common import JobContext

    golden = Path(__file__).resolve().parents[1] / "golden"
    ctx = JobContext.load(golden / "compassmax-245b" / "jobs" / "rl" / "config.json",
                          run_dir=tmp_path, log_to_file=False)
    assert (ctx.derived["rollout_max_sequences"], ctx.derived["seq_len"]) == (66, 32768)
    assert ctx.model_spec.rollout.max_num_seqs == 256
    assert ctx.engine_concurrency() == 66
    assert ctx.engine_concurrency(65536) == 33
    assert ctx.engine_concurrency(1024) == 256  # short sequences: max_num_seqs binds
    tiny = JobContext.load(golden / "tiny" / "jobs" / "rl" / "config.json", run_dir=tmp_path,
                           log_to_file=False)
    assert tiny.derived["rollout_max_sequences"] == -1
    assert tiny.engine_concurrency() == tiny.model_spec.rollout.max_num_seqs

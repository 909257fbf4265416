"""The tiny example with ``rollout.engine: vllm``: `rlspec run` starts vLLM's CPU build from
the rendered rollout.sh, takes RL steps against it, and reloads each step's weights into it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import VLLM_PYTHON

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm")]

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--set", "sft.steps=10", "--set", "train.steps=3", "--set",
         "data.generator.train_size=300", "--set", "data.generator.eval_size=40"]


def test_tiny_rl_steps_against_vllm(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "RLSPEC_VLLM_PYTHON": str(VLLM_PYTHON)}
    run = subprocess.run([sys.executable, "-m", "compiler.main", "run", "examples/tiny/spec.yaml",
                          "--out", str(out), *SHORT, "--set", "rollout.engine=vllm"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    rollout_log = (out / "logs" / "rl-rollout.log").read_text(errors="replace")
    assert "vllm.entrypoints.openai.api_server" in rollout_log  # vLLM served, not our engine
    lines = [json.loads(x) for x in (out / "artifacts" / "rl" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    # vLLM (fp32) and the embedded trainer agree on every token of every step, the steps after
    # a weight reload included: each reload took effect (the CPU build's repack ran).
    for x in lines:
        assert x["train_inference_gap"] < 1e-5, x
    assert json.loads((out / "summary.json").read_text())["jobs"]["rl"]["state"] == "COMPLETED"

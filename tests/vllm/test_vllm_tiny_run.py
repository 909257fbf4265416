"""The tiny example with ``rollout.engine: vllm``: `rlspec run` starts vLLM's CPU build from
the rendered rollout.sh for the screen, both evals and the RL job; the evals and the screen
sample through it, and the RL job takes steps against it, reloading each step's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.jobs.sampled import sample_texts
from runtime.rollout.engine import LocalEngine
from tests.helpers import processes_mentioning
from tests.vllm.conftest import VLLM_PYTHON

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm")]

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--set", "sft.steps=10", "--set", "train.steps=3", "--set",
         "data.generator.train_size=300", "--set", "data.generator.eval_size=40"]


def test_tiny_rl_steps_against_vllm(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "RLSPEC_VLLM_PYTHON": str(VLLM_PYTHON)}
    run = subprocess.run([sys.executable, "-m", "compiler.main", "run", "examples/tiny/spec.yaml",
                          "--out", str(out), *SHORT, "--set", "rollout.engine=vllm",
                          # greedy, one answer a prompt: compared with the embedded engine's
                          "--set", "eval.temperature=0.0", "--set", "eval.samples=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    # every job stopped the engines it started (rollout.sh's trap, lib.sh's rlspec_stop)
    assert processes_mentioning(str(out)) == []
    for log in ("rl-rollout", "screen-engines", "eval_before-engines", "eval_after-engines"):
        text = (out / "logs" / f"{log}.log").read_text(errors="replace")
        assert "vllm.entrypoints.openai.api_server" in text, log  # vLLM served, not our engine
    # Greedy eval through vLLM answers what the embedded engine answers on the same checkpoint.
    metrics = json.loads((out / "artifacts" / "eval_before" / "metrics.json").read_text())
    samples = [json.loads(x) for x in (out / "artifacts" / "eval_before" / "samples.jsonl")
               .read_text().splitlines()]
    assert metrics["temperature"] == 0 and len(samples) == metrics["n_prompts"] == 40
    engine = LocalEngine(out / "artifacts" / "policy_sft", seed=0)
    ours = sample_texts(engine, [x["prompt"] for x in samples], n=1,
                        max_tokens=metrics["max_tokens"], temperature=0.0, seed=0)
    assert [g[0].text for g in ours] == [x["response"] for x in samples]
    screen = json.loads((out / "artifacts" / "pass_rates" / "summary.json").read_text())
    assert screen["prompts"] == 300 and screen["kept"] + screen["dropped"] == 300
    lines = [json.loads(x) for x in (out / "artifacts" / "rl" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    # vLLM (fp32) and the embedded trainer agree on every token of every step, the steps after
    # a weight reload included: each reload took effect (the CPU build's repack ran).
    for x in lines:
        assert x["train_inference_gap"] < 1e-5, x
    assert json.loads((out / "summary.json").read_text())["jobs"]["rl"]["state"] == "COMPLETED"

"""`rlspec run`: the tiny spec's whole graph on this machine, resumable, never clobbering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from compiler.bundle import SUBMISSION
from tests.helpers import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--set", "sft.steps=10", "--set", "train.steps=2", "--set", "data.generator.train_size=300",
         "--set", "data.generator.eval_size=40"]


def rlspec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compiler.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_run_executes_the_graph_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = rlspec("run", "examples/tiny/spec.yaml", "--out", str(out), *SHORT)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    order = ["data", "init", "sft", "eval_before", "screen", "rl", "eval_after", "export"]
    assert list(summary["jobs"]) == order
    assert all(j["state"] == "COMPLETED" for j in summary["jobs"].values())
    for key in ("eval_accuracy_before", "eval_accuracy_after", "rollouts_generated",
                "rollouts_wasted", "rollouts_zero_variance", "wall_seconds"):
        assert summary[key] is not None, key
    assert 0 <= summary["eval_accuracy_after"] <= 1
    assert summary["rollouts_wasted"] <= summary["rollouts_generated"]
    metrics = (out / "artifacts" / "rl" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [0, 1]
    assert (out / "export" / "config.json").is_file()
    # What a run leaves at the top of --out: metrics, TensorBoard events, the summary.
    assert (out / "metrics.jsonl").read_text().splitlines() == metrics
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert {"rl/reward_mean", "rl/zero_variance_rate"} <= set(scalars), scalars

    report = rlspec("report", str(out))
    assert report.returncode == 0, report.stderr
    for png in ("reward.png", "zero_variance.png", "rollouts.png", "gap.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "report" / "report.md").read_text()
    assert "| RL steps logged | 2 |" in table and "| router replay | r3 |" in table

    # The same command again: every job finds its outputs complete; nothing is redone.
    before = {p: p.stat().st_mtime_ns for p in (out / "artifacts").rglob("*") if p.is_file()}
    again = rlspec("run", "examples/tiny/spec.yaml", "--out", str(out), *SHORT)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in (out / "artifacts").rglob("*") if p.is_file()}
    assert after == before

    # Another spec into the same directory is refused; what is there stays.
    other = rlspec("run", "examples/tiny/spec.yaml", "--out", str(out), *SHORT,
                   "--set", "train.steps=3")
    assert other.returncode == 2 and "another spec" in other.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "artifacts").rglob("*") if p.is_file()} == before


def test_fp8_rollouts_run_end_to_end_and_show_in_the_gap(tmp_path: Path) -> None:
    """rollout.fp8 with TIS on the tiny spec: the embedded engines serve FP8-rounded weights
    (the rollout server is started with --quantization fp8), the run completes, and each step's
    train_inference_gap is well above the 1e-4 that the same spec's fp32 engines stay under
    (test_run_executes_the_graph_and_resumes runs at weight_sync_tolerance 1e-4)."""
    out = tmp_path / "run"
    run = rlspec("run", "examples/tiny/spec.yaml", "--out", str(out), *SHORT,
                 "--set", "rollout.fp8=true", "--set", "algorithm.correction.mode=tis",
                 "--set", "system.weight_sync_tolerance=0.05")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert all(j["state"] == "COMPLETED" for j in summary["jobs"].values())
    served = (out / "logs" / "rl-rollout.log").read_text()
    assert "--quantization fp8" in served
    metrics = [json.loads(line) for line in
               (out / "artifacts" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    gaps = [m["train_inference_gap"] for m in metrics]
    assert all(5e-4 < g <= 0.05 for g in gaps), gaps


def test_run_refuses_a_cluster_spec(tmp_path: Path) -> None:
    result = rlspec("run", "examples/qwen3-30b-a3b.yaml", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "rlspec submit" in result.stderr
    assert not (tmp_path / "x" / "bundle").exists()


def test_run_refuses_a_folder_of_other_files(tmp_path: Path) -> None:
    """A run writes summary.json, metrics.jsonl, tensorboard/ at the top of --out."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "summary.json").write_text("my notes")
    result = rlspec("run", "examples/tiny/spec.yaml", "--out", str(tmp_path / "mine"))
    assert result.returncode == 2 and "choose a new or empty --out" in result.stderr
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["summary.json"]
    assert (tmp_path / "mine" / "summary.json").read_text() == "my notes"


def test_sigterm_stops_every_job_process_and_the_run_resumes(tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "run"
    args = ["run", "examples/tiny/spec.yaml", "--out", str(out), *SHORT[:2],
            "--set", "train.steps=40", *SHORT[4:]]
    proc = subprocess.Popen([sys.executable, "-m", "compiler.main", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "artifacts" / "rl" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the RL job did not log a step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err[-2000:]
    deadline = time.monotonic() + 30  # PDEATHSIG is asynchronous: wait for the processes to go
    while processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(out)) == []  # no engine, trainer or driver left behind
    record = json.loads((out / "bundle" / SUBMISSION).read_text())
    assert record["jobs"]["rl"]["state"] == "INTERRUPTED"

    again = rlspec(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(40))

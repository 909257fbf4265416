"""The RL job end to end: `bash jobs/rl/launch.sh` of a short tiny run (engine + trainer + driver).

A bundle of the tiny spec with 3 RL steps of 4 prompts × 4 samples (global batch 8) runs
data → init → sft (short) → rl as the scheduler runs them. Checks: metrics.jsonl has one
line per step with the documented keys, policy_final and rl_metrics are complete, the
summary's fields, the ledger's conservation, and that no process of the run is left (the
engine's port is closed). Two runs of one spec log the same steps; a run SIGKILLed mid-way
and resumed logs the steps of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.exchange import RunPaths
from runtime.jobs.common import is_complete
from runtime.ports import free_ports
from runtime.rollout.shared_weights import segment_path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SPEC = ROOT / "examples" / "tiny" / "spec.yaml"

OVERRIDES = [
    "rollout.prompts_per_step=4", "rollout.n=4", "train.global_batch_size=8",
    "train.micro_batch_size=8", "sft.steps=30",
    "filters=[{type: reward_shaping}, {type: flat_groups, action: rl_zvp}]",
]
METRIC_KEYS = {
    "step", "reward_mean", "train_accuracy", "zero_variance_rate", "rollouts_generated",
    "rollouts_used", "rollouts_reshaped", "rollouts_dropped", "tokens_per_second", "entropy",
    "clip_fraction", "train_inference_gap", "kl", "wall_seconds", "reshaped_advantage_share",
    "reshaped_grad_norm_share", "weight_sync_probe_gap",
    "generation_seconds", "replica_busy_seconds", "replica_idle_fraction",
}


def _free_port() -> int:
    """The engines' base port: a block for the tiny example's replicas (runtime.ports)."""
    return free_ports(4)


def _env(run_dir: Path, port: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RLSPEC_")) and k not in ("RANK",)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RLSPEC_RUN_DIR"] = str(run_dir)
    env["RLSPEC_PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(ROOT)
    if port is not None:
        env["RLSPEC_ROLLOUT_BASE_PORT"] = str(port)
    return env


def _compile(out: Path, steps: int, *extra: str) -> Path:
    args = [str(VENV_BIN / "rlspec"), "compile", str(SPEC), "-o", str(out), "--force",
            "--set", f"train.steps={steps}"]
    for o in [*OVERRIDES, *extra]:
        args += ["--set", o]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=120)
    return out


def _launch(bundle: Path, job: str, run_dir: Path, port: int | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(bundle / "jobs" / job / "launch.sh")],
                          env=_env(run_dir, port), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _processes_of(run_dir: Path) -> list[str]:
    """Command lines of live processes whose environment names this run dir."""
    found = []
    needle = f"RLSPEC_RUN_DIR={run_dir}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            continue
        if needle + b"\0" in environ + b"\0" and state != "Z":
            found.append(f"{pid}: {cmd}")
    return found


def _wait_gone(run_dir: Path, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (_processes_of(run_dir) or not _port_closed(port)) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle with 3 RL steps and a run dir holding dataset, policy_init and policy_sft."""
    root = tmp_path_factory.mktemp("rl")
    bundle = _compile(root / "bundle", steps=3)
    run_dir = root / "run"
    for job in ("data", "init", "sft"):
        proc = _launch(bundle, job, run_dir)
        assert proc.returncode == 0, proc.stderr
    return bundle, run_dir


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TIME_KEYS = {"wall_seconds", "tokens_per_second", "generation_seconds", "replica_busy_seconds",
             "replica_idle_fraction"}


def _untimed(lines: list[dict]) -> list[dict]:
    """Metrics lines without their time fields."""
    return [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in lines]


def _leaves(m: dict, approx: bool = False) -> dict:
    """A metrics line flattened to {dotted key: value}; with ``approx`` its floats compare
    equal within a relative 1e-5 (``pytest.approx``; the train-inference and probe gaps,
    themselves float noise of about 1e-7, within 1e-6), its other values exactly."""
    out: dict = {}
    for k, v in m.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _leaves(v, approx).items()})
        elif approx and isinstance(v, float):
            gap = k in ("train_inference_gap", "weight_sync_probe_gap")
            out[k] = pytest.approx(v, rel=1e-5, abs=1e-6 if gap else 0)
        else:
            out[k] = v
    return out


def _run_copy(base_run: Path, run_dir: Path) -> Path:
    """A run dir holding ``base_run``'s dataset, policy_init and policy_sft."""
    for name in ("dataset", "policy_init", "policy_sft"):
        shutil.copytree(base_run / "artifacts" / name, run_dir / "artifacts" / name)
    return run_dir


def test_rl_job_end_to_end(prepared: tuple[Path, Path]) -> None:
    bundle, run_dir = prepared
    port = _free_port()
    proc = _launch(bundle, "rl", run_dir, port)
    assert proc.returncode == 0, proc.stderr + (run_dir / "logs" / "rl-train.log").read_text()
    out = run_dir / "artifacts" / "rl"
    assert is_complete(out) and is_complete(run_dir / "artifacts" / "policy_final")
    assert (run_dir / "artifacts" / "policy_final" / "model.safetensors").is_file()
    lines = _metrics(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines:
        assert not METRIC_KEYS - set(m), METRIC_KEYS - set(m)
        assert m["rollouts_generated"] == 16
        assert m["responses_trained"] % 8 == 0
        assert m["train_inference_gap"] < 1e-3  # R3 replay: trainer ≈ engine
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["rollouts_generated"] == 48
    assert summary["eval_accuracy_before"] is None
    for key in ("rollouts_wasted", "rollouts_zero_variance", "wall_seconds"):
        assert key in summary
    assert summary["rollouts_reshaped"] == sum(m["rollouts_reshaped"] for m in lines)
    for m in lines:  # the share of Σ|advantage| the RL-ZVP groups carry, 0 without any
        assert 0 <= m["reshaped_advantage_share"] <= 1
        if m["rollouts_reshaped"] == 0:
            assert m["reshaped_advantage_share"] == 0
            assert m["reshaped_grad_norm_share"] == 0  # ‖g_R‖ / ‖g‖ (runtime.trainer)
        else:
            assert m["reshaped_grad_norm_share"] > 0
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["generated"] == (ledger["used"] + ledger["reshaped"] + ledger["kept_flat"]
                                   + ledger["dropped"])
    assert ledger["generated"] == sum(m["rollouts_generated"] for m in lines)
    _wait_gone(run_dir, port)
    assert _port_closed(port)
    assert _processes_of(run_dir) == []
    # a second launch finds the outputs complete and ends cleanly
    port = _free_port()
    again = _launch(bundle, "rl", run_dir, port)
    assert again.returncode == 0, again.stderr
    assert "outputs exist, skipping" in again.stderr
    _wait_gone(run_dir, port)  # engine and trainer stopped while still starting: no orphans
    assert _processes_of(run_dir) == []


def test_same_seed_same_steps_and_another_seed_other_rollouts(prepared: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    """Two runs of one spec log the same metrics lines (time fields aside): the rollouts,
    their rewards and the updates are the same. Another ``train.seed`` samples other
    rollouts from the same first policy (the first step's entropy, taken over the sampled
    tokens, differs)."""
    _, base_run = prepared
    bundle = _compile(tmp_path / "bundle", 2)
    runs = []
    for name in ("a", "b"):
        run_dir = _run_copy(base_run, tmp_path / name)
        proc = _launch(bundle, "rl", run_dir, _free_port())
        assert proc.returncode == 0, proc.stderr
        runs.append(_metrics(run_dir / "artifacts" / "rl" / "metrics.jsonl"))
    assert [m["step"] for m in runs[0]] == [0, 1]
    assert _untimed(runs[0]) == _untimed(runs[1])
    other = _compile(tmp_path / "other", 2, "train.seed=4321")
    run_dir = _run_copy(base_run, tmp_path / "c")
    proc = _launch(other, "rl", run_dir, _free_port())
    assert proc.returncode == 0, proc.stderr
    lines = _metrics(run_dir / "artifacts" / "rl" / "metrics.jsonl")
    assert lines[0]["entropy"] != runs[0][0]["entropy"]


def test_rl_job_resumes_after_sigkill(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """A run SIGKILLed mid-way and launched again logs exactly the steps of an uninterrupted
    run (time fields aside): the interrupted step re-samples the same rollouts (seeded
    requests), and with a checkpoint every step the trainer resumes exactly. The killed and
    resumed run syncs by broadcast (``weight_sync: nccl``: the trainer sends each version to
    the engine in vLLM's NCCL wire format, over gloo), the uninterrupted one from disk; only
    the restart's first load, which the new trainer does not hold, comes from its folder."""
    _, base_run = prepared
    steps = 8
    bundle = _compile(tmp_path / "bundle", steps, "train.checkpoint.interval=1")
    reference = _run_copy(base_run, tmp_path / "reference")
    proc = _launch(bundle, "rl", reference, _free_port())
    assert proc.returncode == 0, proc.stderr
    nccl = _compile(tmp_path / "nccl_bundle", steps, "train.checkpoint.interval=1",
                    "system.weight_sync=nccl")
    rollout_sh = (nccl / "jobs" / "rl" / "rollout.sh").read_text()
    assert "--weight-transfer-config '{\"backend\":\"nccl\"}'" in rollout_sh
    run_dir = _run_copy(base_run, tmp_path / "run")
    _kill_after(nccl, run_dir, 2)
    assert not is_complete(run_dir / "artifacts" / "rl")
    port = _free_port()
    again = _launch(nccl, "rl", run_dir, port)
    assert again.returncode == 0, again.stderr
    assert "resuming after step" in again.stderr
    fallbacks = [line for line in again.stderr.splitlines() if "not broadcast" in line]
    assert len(fallbacks) == 1, fallbacks
    assert "broadcast to the engines" in again.stderr
    lines = _metrics(run_dir / "artifacts" / "rl" / "metrics.jsonl")
    assert [m["step"] for m in lines] == list(range(steps))
    assert _untimed(lines) == _untimed(_metrics(reference / "artifacts" / "rl" / "metrics.jsonl"))
    summary = json.loads((run_dir / "artifacts" / "rl" / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["rollouts_generated"] == sum(m["rollouts_generated"] for m in lines)
    assert is_complete(run_dir / "artifacts" / "policy_final")
    _wait_gone(run_dir, port)
    assert _processes_of(run_dir) == []


def _kill_after(bundle: Path, run_dir: Path, lines: int, until: Path | None = None) -> None:
    """Launch the RL job and SIGKILL its process group once ``lines`` steps are logged (and
    the file ``until`` exists)."""
    metrics = run_dir / "artifacts" / "rl" / "metrics.jsonl"
    port = _free_port()
    proc = subprocess.Popen(["bash", str(bundle / "jobs" / "rl" / "launch.sh")],
                            env=_env(run_dir, port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if (metrics.is_file() and len(metrics.read_text().splitlines()) >= lines
                    and (until is None or until.exists())):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    _wait_gone(run_dir, port)
    assert _processes_of(run_dir) == []


def test_bounded_staleness_pipelines_steps_and_resumes_after_sigkill(
        prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """``system.max_staleness: 2``: step s is sampled by the weights of step max(0, s − 2)
    (the engines generate ahead while the trainer trains), each line records its policy
    version and staleness (never above 2), and the summary the rollouts per staleness. A run
    SIGKILLed after two logged steps, with later steps handed over and untrained, trains
    those batches after the restart: it logs exactly the steps of an uninterrupted run (time
    fields aside), and its ledger counts every rollout once. The killed and resumed runs
    sync over shared memory (``weight_sync: ipc``) and by broadcast (``nccl``: the trainer
    holds copies, since it trains the next batch while the driver pushes): the trainer
    keeps each version until no engine can be asked to load it. The uninterrupted run syncs
    from disk."""
    _, base_run = prepared
    steps = 6
    bundle = _compile(tmp_path / "bundle", steps, "system.max_staleness=2",
                      "train.checkpoint.interval=1")
    reference = _run_copy(base_run, tmp_path / "reference")
    proc = _launch(bundle, "rl", reference, _free_port())
    assert proc.returncode == 0, proc.stderr + (reference / "logs" / "rl-train.log").read_text()
    out = reference / "artifacts" / "rl"
    lines = _metrics(out / "metrics.jsonl")
    assert [m["policy_version"] for m in lines] == [0, 0, 0, 1, 2, 3]
    assert [m["staleness"] for m in lines] == [0, 1, 2, 2, 2, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollouts_by_staleness"] == {"0": 16, "1": 16, "2": 64}
    assert all(m["train_inference_gap"] is not None for m in lines)
    # the trainer's check skips stale batches; the probe checks every load (fp32 both sides)
    assert all(m["weight_sync_probe_gap"] < 1e-5 for m in lines)

    for sync, said in (("ipc", "mapped over IPC"), ("nccl", "broadcast to the engines")):
        bundle = _compile(tmp_path / f"{sync}_bundle", steps, "system.max_staleness=2",
                          "train.checkpoint.interval=1", f"system.weight_sync={sync}")
        run_dir = _run_copy(base_run, tmp_path / f"run_{sync}")
        _kill_after(bundle, run_dir, 2)
        again = _launch(bundle, "rl", run_dir, _free_port())
        assert again.returncode == 0, again.stderr
        assert "resuming after step" in again.stderr
        assert "were handed over and are trained first" in again.stderr
        assert said in again.stderr
        resumed = _metrics(run_dir / "artifacts" / "rl" / "metrics.jsonl")
        # the gaps are float noise of the engines' weights (mapped, broadcast or read), ~1e-7
        assert ([_leaves(m) for m in _untimed(resumed)]
                == [_leaves(m, approx=True) for m in _untimed(lines)]), sync
        ledger = json.loads((run_dir / "artifacts" / "rl" / "ledger.json").read_text())
        assert ledger == json.loads((out / "ledger.json").read_text())
        assert ledger["generated"] == sum(m["rollouts_generated"] for m in resumed) == 96


def test_colocated_engines_sleep_through_training_and_resume_after_sigkill(
        prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """``rollout.placement: colocated`` with ``system.weight_sync: ipc``: the engine sleeps
    (level 2: its weights discarded) from each hand-over until the trainer's weights are
    loaded, mapped from the trainer's shared memory, and the run logs exactly the steps of a
    disaggregated run with disk sync (time fields aside: an engine woken without its reload
    refuses to sample, so a wrong order fails the run; the probe checks every load). Killed
    after two steps, with the third handed over and trained but not logged, the restarted run
    puts the engine to sleep before that batch is trained again and still logs the same steps;
    the weights it restarts from, shared by the killed trainer, are read from their folder."""
    _, base_run = prepared
    steps = 4
    reference_bundle = _compile(tmp_path / "reference_bundle", steps,
                                "train.checkpoint.interval=1")
    reference = _run_copy(base_run, tmp_path / "reference")
    proc = _launch(reference_bundle, "rl", reference, _free_port())
    assert proc.returncode == 0, proc.stderr
    want = _untimed(_metrics(reference / "artifacts" / "rl" / "metrics.jsonl"))

    bundle = _compile(tmp_path / "bundle", steps, "train.checkpoint.interval=1",
                      "rollout.placement=colocated", "system.weight_sync=ipc")
    rollout_sh = (bundle / "jobs" / "rl" / "rollout.sh").read_text()
    assert "--enable-sleep-mode" in rollout_sh
    assert "--weight-transfer-config '{\"backend\":\"ipc\"}'" in rollout_sh
    assert "export VLLM_ALLOW_INSECURE_SERIALIZATION=1" in rollout_sh
    run_dir = _run_copy(base_run, tmp_path / "run")
    # Killed once the trainer has finished step 2 (its done file) and before the driver logs
    # it: the driver's state then holds step 2 as handed over, not yet finished.
    _kill_after(bundle, run_dir, 2, until=run_dir / "artifacts" / "rl" / "exchange" / "done-2.json")
    # The killed trainer's shared-memory segments outlive it; its successor removes them.
    owner = RunPaths(run_dir).owner
    shm = segment_path(owner, 0).parent
    assert sorted(shm.glob(f"rlspec-{owner}-v*"))
    port = _free_port()
    again = _launch(bundle, "rl", run_dir, port)
    assert again.returncode == 0, again.stderr
    _wait_gone(run_dir, port)  # the trainer ends after the launch script (SIGTERM)
    assert sorted(shm.glob(f"rlspec-{owner}-v*")) == []  # and its own at exit
    assert "resuming after step 2" in again.stderr
    assert "were handed over and are trained first" in again.stderr
    assert "the engines sleep while the handed-over steps train" in again.stderr
    # Every load but the first went over IPC (a failed IPC load fails the run; only a
    # version nobody shares falls back to its folder, and says so).
    fallbacks = [line for line in again.stderr.splitlines() if "not over IPC" in line]
    assert len(fallbacks) == 1 and "weights v2 from the folder" in fallbacks[0], fallbacks
    assert "has ended" in fallbacks[0] and "weights v3 mapped over IPC" in again.stderr
    lines = _metrics(run_dir / "artifacts" / "rl" / "metrics.jsonl")
    assert all(m["sleep_wake_seconds"] > 0 for m in lines)
    got = [{k: v for k, v in m.items() if k != "sleep_wake_seconds"} for m in _untimed(lines)]
    # The same rollouts and counts; the engine's log-probs after a wake-up may differ from the
    # always-awake engine's in the last bit (its reloaded weights sit elsewhere in memory, and
    # the CPU matmul kernels depend on alignment), and TIS carries that into loss and grad norm.
    assert [_leaves(m) for m in got] == [_leaves(m, approx=True) for m in want]
    assert "sleep_wake_seconds" not in _metrics(reference / "artifacts" / "rl" / "metrics.jsonl")[0]


def test_rl_job_stops_at_the_rollout_budget(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """16 rollouts a step and a budget of 20: the second step reaches it, and the run ends
    there, trainer included (final checkpoint and policy_final from step 2). In-run held-out
    evaluation (every 5 steps) also runs at that last step."""
    _, base_run = prepared
    bundle = _compile(tmp_path / "bundle", 6, "train.rollout_budget=20", "eval.every_steps=5")
    run_dir = tmp_path / "run"
    for name in ("dataset", "policy_init", "policy_sft"):
        shutil.copytree(base_run / "artifacts" / name, run_dir / "artifacts" / name)
    port = _free_port()
    proc = _launch(bundle, "rl", run_dir, port)
    assert proc.returncode == 0, proc.stderr + (run_dir / "logs" / "rl-train.log").read_text()
    out = run_dir / "artifacts" / "rl"
    lines = _metrics(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [0, 1]
    assert "eval_accuracy" not in lines[0] and 0 <= lines[1]["eval_accuracy"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["rollouts_generated"] == 32
    assert json.loads((run_dir / "artifacts" / "policy_final" / ".complete").read_text())["steps"] == 2
    assert (run_dir / "checkpoints" / "rl").is_dir()
    _wait_gone(run_dir, port)
    assert _processes_of(run_dir) == []


def test_kl_to_the_starting_policy_reaches_the_trainer(prepared: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    """algorithm.kl.coefficient > 0: the trainer holds the starting policy frozen as the
    reference; the first update leaves the policy there (KL 0 at the first optimizer step),
    later ones move it away and the penalty is logged."""
    _, base_run = prepared
    bundle = _compile(tmp_path / "bundle", 2, "algorithm.kl.coefficient=0.1")
    run_dir = tmp_path / "run"
    for name in ("dataset", "policy_init", "policy_sft"):
        shutil.copytree(base_run / "artifacts" / name, run_dir / "artifacts" / name)
    proc = _launch(bundle, "rl", run_dir, _free_port())
    assert proc.returncode == 0, proc.stderr + (run_dir / "logs" / "rl-train.log").read_text()
    lines = _metrics(run_dir / "artifacts" / "rl" / "metrics.jsonl")
    trained = [m for m in lines if m["kl"] is not None]
    assert trained, lines
    assert trained[-1]["kl"] > 0

"""`rlspec submit / status / cancel` against a real Slurm cluster (tests/slurm/conftest.py).

The tiny example is compiled for Slurm with the shortened run of tests/runtime/test_run.py;
each test drives the real CLI in a subprocess, as a user on a login node would, and checks
what Slurm itself (scontrol, squeue, sacct) says happened.

Failures are injected at run time, never by editing the bundle (submit verifies its files):
the jobs run `$RLSPEC_PYTHON -m runtime.jobs.<job>`, and a test submits with RLSPEC_PYTHON
pointing at a small wrapper that fails, or hangs, for one job and runs the real interpreter
for the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runtime.ports import free_ports
from tests.helpers import status_rows
from tests.slurm.conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

ROOT = Path(__file__).resolve().parents[2]
# The shortened tiny run of tests/runtime/test_run.py.
SHORT = ["--set", "sft.steps=10", "--set", "train.steps=2",
         "--set", "data.generator.train_size=300", "--set", "data.generator.eval_size=40"]
ON_SLURM = ["--set", "cluster.scheduler=slurm", "--set", "cluster.partition=debug",
            # The test nodes have this machine's cores; the spec's default asks for 8.
            "--set", "cluster.cpus_per_task=1"]
ORDER = ["data", "init", "sft", "eval_before", "screen", "rl", "eval_after", "export"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def rlspec(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it; the jobs it submits inherit this environment (sbatch's
    default --export=ALL): this checkout on PYTHONPATH and this interpreter as the runtime's."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "RLSPEC_PYTHON": sys.executable, **(env or {})}
    return subprocess.run([sys.executable, "-m", "compiler.main", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=full_env)


def compile_tiny(out: Path) -> Path:
    result = rlspec("compile", "examples/tiny/spec.yaml", "-o", out, *ON_SLURM, *SHORT)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["scheduler"] == "slurm"
    return out


def submitted(bundle: Path) -> dict[str, str]:
    """job → Slurm id, from the bundle's submission record."""
    record = json.loads((bundle / "submission.json").read_text())
    assert record["backend"] == "slurm", record
    return {name: job["id"] for name, job in record["jobs"].items()}


def depends_on(bundle: Path) -> dict[str, list[str]]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {name: job["depends_on"] for name, job in manifest["jobs"].items()}


def status(bundle: Path) -> tuple[dict[str, list[str]], str]:
    result = rlspec("status", bundle)
    assert result.returncode == 0, result.stderr
    return status_rows(result.stdout), result.stdout


def fake_python(tmp_path: Path, cases: str) -> dict[str, str]:
    """An RLSPEC_PYTHON that runs `cases` (bash `case` arms on " $* ") before the real
    interpreter; returns the environment to submit with."""
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'case " $* " in\n{cases}\nesac\n'
        f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return {"RLSPEC_PYTHON": str(wrapper)}


@contextlib.contextmanager
def partition_down(cluster: SlurmCluster) -> Iterator[None]:
    """Jobs are accepted but none starts: what was submitted can be looked at unchanged."""
    cluster.run("scontrol", "update", f"PartitionName={cluster.partition}", "State=DOWN")
    try:
        yield
    finally:
        cluster.run("scontrol", "update", f"PartitionName={cluster.partition}", "State=UP")


def scontrol_job(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", "-o", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", out))


# --------------------------------------------------------------------------- the cluster


def test_the_cluster_listens_on_loopback_only(slurm_cluster: SlurmCluster) -> None:
    sockets = slurm_cluster.listening_sockets()
    names = {name for _, name, _ in sockets}
    assert {"mariadbd", "slurmdbd", "slurmctld", "slurmd"} <= names, sockets
    assert all(local.startswith("127.0.0.1:") for local, _, _ in sockets), sockets
    # munged has no TCP socket at all: only its unix socket in the cluster's directory.
    assert not [s for s in sockets if s[1] == "munged"]


# --------------------------------------------------------------------------- a: end to end


def test_the_tiny_example_runs_end_to_end_through_slurm(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    bundle = compile_tiny(tmp_path / "tiny")
    deps = depends_on(bundle)

    with partition_down(slurm_cluster):
        # The rollout engine's port (8000 by default on a cluster) is taken free here.
        result = rlspec("submit", bundle, env={"RLSPEC_ROLLOUT_BASE_PORT": str(free_ports(1))})
        assert result.returncode == 0, result.stderr
        ids = submitted(bundle)
        assert list(ids) == ORDER
        for name in ORDER:
            assert re.search(rf"^submitted {name}: Slurm job {ids[name]}\b", result.stdout, re.M)
        # Slurm holds each job on exactly its inputs' jobs, afterok.
        for name, job_id in ids.items():
            job = scontrol_job(slurm_cluster, job_id)
            assert job["JobState"] == "PENDING", job
            want = {ids[d] for d in deps[name]}
            got = set(re.findall(r"afterok:(\d+)", job.get("Dependency", "")))
            assert got == want, (name, job.get("Dependency"))
            if want:
                assert job["Dependency"].count("(unfulfilled)") == len(want), job["Dependency"]
            else:
                assert job.get("Dependency") in (None, "(null)"), job["Dependency"]
        rows, _ = status(bundle)
        assert {name: cells[2] for name, cells in rows.items()} == dict.fromkeys(ORDER, "PENDING")

    # Every socket opened while the jobs run (the rollout engine's HTTP server included)
    # is on loopback.
    seen: set[tuple[str, str, int]] = set()
    deadline = time.monotonic() + 300
    while slurm_cluster.squeue(list(ids.values())) and time.monotonic() < deadline:
        seen.update(slurm_cluster.listening_sockets())
        time.sleep(0.5)
    assert all(local.startswith("127.0.0.1:") for local, _, _ in seen), seen

    states = slurm_cluster.wait_finished(list(ids.values()))
    assert all(states[ids[n]] == "COMPLETED" for n in ORDER), (states, bundle / "logs")

    # Graph order, from accounting: no job started before each of its inputs had ended.
    times = slurm_cluster.sacct(list(ids.values()), "JobID,State,Start,End")
    for name in ORDER:
        start = times[ids[name]][1]
        for dep in deps[name]:
            assert times[ids[dep]][2] <= start, (name, dep, times)

    rows, out = status(bundle)
    assert list(rows) == ORDER
    for name in ORDER:
        assert rows[name][1] == ids[name] and rows[name][2] == "COMPLETED", out
        assert Path(rows[name][3]).is_file(), rows[name]
    assert "failed" not in out

    # The run directory of a Slurm bundle: cluster.output_dir (relative: under the bundle).
    run = bundle / "runs" / "tiny"
    metrics = (run / "artifacts" / "rl" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [0, 1]
    summary = json.loads((run / "artifacts" / "rl" / "summary.json").read_text())
    assert summary, summary
    for when in ("eval_before", "eval_after"):
        accuracy = json.loads((run / "artifacts" / when / "metrics.json").read_text())
        assert accuracy, when
    assert (run / "export" / "config.json").is_file()
    assert {p.stem for p in (run / "logs").glob("*.log")} >= set(ORDER)

    # Cancelling a finished run cancels nothing, and its record keeps the real states.
    cancel = rlspec("cancel", bundle)
    assert cancel.returncode == 0 and "cancelled 0 job(s)" in cancel.stdout, cancel.stdout
    record = json.loads((bundle / "submission.json").read_text())
    assert {j["state"] for j in record["jobs"].values()} == {"COMPLETED"}


# --------------------------------------------------------------------------- b: a failed job


def test_a_failed_job_cancels_its_dependents_and_status_names_it(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    bundle = compile_tiny(tmp_path / "tiny")
    env = fake_python(tmp_path, '  *" -m runtime.jobs.sft "*) echo "injected failure of sft" >&2;'
                                " exit 3 ;;")
    result = rlspec("submit", bundle, env=env)
    assert result.returncode == 0, result.stderr
    ids = submitted(bundle)
    states = slurm_cluster.wait_finished([ids["data"], ids["init"], ids["sft"]])
    # Every job downstream of sft never runs: Slurm cancels it (DependencyNeverSatisfied)
    # rather than leaving it pending for ever.
    downstream = ["eval_before", "screen", "rl", "eval_after", "export"]
    states.update(slurm_cluster.wait_finished([ids[n] for n in downstream], timeout=30))
    by_name = {name: states[ids[name]] for name in ORDER}
    assert by_name["data"] == by_name["init"] == "COMPLETED", by_name
    assert by_name["sft"] == "FAILED", by_name
    assert all(by_name[n] == "CANCELLED" for n in downstream), by_name
    never = slurm_cluster.sacct([ids[n] for n in downstream], "JobID,Start")
    assert all(row[0] in ("None", "Unknown") for row in never.values()), never

    rows, out = status(bundle)
    assert {n: cells[2] for n, cells in rows.items()} == by_name, out
    log = re.search(r"^sft failed; log: (\S+)$", out, re.M)
    assert log, out
    assert Path(log.group(1)) == bundle / "logs" / f"{ids['sft']}_0_log.out"
    assert "injected failure of sft" in Path(log.group(1)).read_text()
    assert not (bundle / "runs" / "tiny" / "artifacts" / "policy_sft" / ".complete").exists()


# --------------------------------------------------------------------------- c: cancel


def test_cancel_cancels_every_submitted_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    bundle = compile_tiny(tmp_path / "tiny")
    with partition_down(slurm_cluster):
        assert rlspec("submit", bundle).returncode == 0
        ids = submitted(bundle)
        assert set(slurm_cluster.squeue(list(ids.values())).values()) == {"PENDING"}
        result = rlspec("cancel", bundle)
        assert result.returncode == 0, result.stderr
        assert f"cancelled {len(ORDER)} job(s)" in result.stdout, result.stdout
        states = slurm_cluster.wait_finished(list(ids.values()))
    assert set(states.values()) == {"CANCELLED"}, states
    rows, out = status(bundle)
    assert {n: cells[2] for n, cells in rows.items()} == dict.fromkeys(ORDER, "CANCELLED"), out
    record = json.loads((bundle / "submission.json").read_text())
    assert {j["state"] for j in record["jobs"].values()} == {"CANCELLED"}


# --------------------------------------------------------------------------- d: resubmission


def test_submitting_a_submitted_bundle_again_is_refused(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    bundle = compile_tiny(tmp_path / "tiny")
    with partition_down(slurm_cluster):
        assert rlspec("submit", bundle).returncode == 0
        record = (bundle / "submission.json").read_text()
        ids = submitted(bundle)
        queued = slurm_cluster.run("squeue", "-h", "-o", "%i").split()
        again = rlspec("submit", bundle)
        assert again.returncode == 2
        assert "already submitted" in again.stderr and "--force" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr
        # Nothing was sent, nothing was rewritten.
        assert slurm_cluster.run("squeue", "-h", "-o", "%i").split() == queued
        assert (bundle / "submission.json").read_text() == record
        assert rlspec("cancel", bundle).returncode == 0
    slurm_cluster.wait_finished(list(ids.values()))


# --------------------------------------------------------------------------- e: died, no result


def test_status_reports_jobs_that_died_from_accounting(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    bundle = compile_tiny(tmp_path / "tiny")
    # data and init hang (init after noting its pid): one is scancel'd, the other killed.
    env = fake_python(tmp_path, (
        '  *" -m runtime.jobs.data "*) exec sleep 600 ;;\n'
        f'  *" -m runtime.jobs.init "*) echo $$ > {tmp_path}/init.pid; exec sleep 600 ;;'))
    assert rlspec("submit", bundle, env=env).returncode == 0
    ids = submitted(bundle)
    deadline = time.monotonic() + 120
    while not (tmp_path / "init.pid").is_file() or slurm_cluster.squeue(
            [ids["data"]]).get(ids["data"]) != "RUNNING":
        assert time.monotonic() < deadline, slurm_cluster.run("squeue")
        time.sleep(0.5)
    pid = int((tmp_path / "init.pid").read_text())
    while psutil.Process(pid).name() != "sleep":  # the pid file is written before the exec
        assert time.monotonic() < deadline, psutil.Process(pid).cmdline()
        time.sleep(0.05)

    # Neither job writes a result: data is cancelled by an administrator, init's process
    # is killed (the OOM killer, say).
    slurm_cluster.run("scancel", ids["data"])
    os.kill(pid, signal.SIGKILL)

    states = slurm_cluster.wait_finished(list(ids.values()))
    assert states[ids["data"]] == "CANCELLED" and states[ids["init"]] == "FAILED", states
    # Once slurmctld has forgotten them (MinJobAge), only accounting knows what happened.
    slurm_cluster.wait_gone_from_squeue(list(ids.values()))
    assert slurm_cluster.sacct([ids["data"]])[ids["data"]][0].startswith("CANCELLED by ")

    rows, out = status(bundle)
    assert rows["data"][2] == "CANCELLED", out
    assert rows["init"][2] == "FAILED", out
    assert all(rows[n][2] == "CANCELLED" for n in ORDER[2:]), out
    assert re.search(rf"^init failed; log: {re.escape(str(bundle))}/logs/{ids['init']}_0_log.out$",
                     out, re.M), out
    # The bundle's own record knew nothing of this: the states came from sacct.
    record = json.loads((bundle / "submission.json").read_text())
    assert {j["state"] for j in record["jobs"].values()} == {"SUBMITTED"}


# --------------------------------------------------------------------------- requeue


def test_a_requeued_rl_job_resumes_from_its_last_complete_step(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Preemption: Slurm requeues the running RL job (`scontrol requeue`, what a preempting
    partition does with --requeue); the job starts again and continues after its last
    complete step — no step logged twice, none skipped — and the run finishes. The weights
    reach the engine by the trainer's broadcast (`weight_sync: nccl`, gloo on the node's
    address): the requeued job's trainer is a new group, whose first version, which it does
    not hold, comes from its folder."""
    steps = 30
    bundle = tmp_path / "tiny"
    result = rlspec("compile", "examples/tiny/spec.yaml", "-o", bundle, *ON_SLURM, *SHORT,
                    "--set", f"train.steps={steps}", "--set", "system.weight_sync=nccl")
    assert result.returncode == 0, result.stderr
    result = rlspec("submit", bundle, env={"RLSPEC_ROLLOUT_BASE_PORT": str(free_ports(1))})
    assert result.returncode == 0, result.stderr
    ids = submitted(bundle)
    run = bundle / "runs" / "tiny"
    metrics = run / "artifacts" / "rl" / "metrics.jsonl"

    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, ("the RL job logged no steps", status(bundle)[1])
        time.sleep(0.2)
    slurm_cluster.run("scontrol", "requeue", ids["rl"])

    # a bound, not a timing: 27 more steps and the jobs after RL, on a machine 2 cores
    states = slurm_cluster.wait_finished(list(ids.values()), timeout=900)
    assert all(states[ids[n]] == "COMPLETED" for n in ORDER), (states, bundle / "logs")
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(steps))
    history = slurm_cluster.run("sacct", "-n", "-X", "-P", "--duplicates", "-o", "JobID,State",
                                "-j", ids["rl"])
    assert "REQUEUED" in history, history  # it did run twice
    log = (run / "logs" / "rl.log").read_text()
    assert "resuming after step" in log
    assert log.count("broadcast to the engines") == 2, log[-3000:]  # once per session
    assert log.count("not broadcast") == 1, log[-3000:]


def test_a_job_near_its_time_limit_requeues_itself_and_goes_on(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """cluster.max_requeues: every launch script starts lib.sh's watcher, which requeues the
    job RLSPEC_REQUEUE_LEAD_S before its time limit; Slurm starts it again
    (SLURM_RESTART_COUNT 1), and with no requeue left it runs on to its end. Here a 2-minute
    limit and a 100 s lead: the first run, which would run past its limit, is requeued about
    20 s in, and the second one completes."""
    bundle = tmp_path / "tiny"
    result = rlspec("compile", "examples/tiny/spec.yaml", "-o", bundle, *ON_SLURM, *SHORT,
                    "--set", "cluster.max_requeues=1")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"source {bundle / 'lib.sh'}\n"
        "rlspec_requeue_before_time_limit probe\n"
        'echo "start ${SLURM_RESTART_COUNT:-0}" >> "$RLSPEC_RUN_DIR/starts"\n'
        # the first run works on past its time limit; the second finishes
        'if (( ${SLURM_RESTART_COUNT:-0} == 0 )); then while :; do sleep 1; done; fi\n')
    out = slurm_cluster.run(
        "sbatch", "--parsable", f"--partition={slurm_cluster.partition}", "--time=2",
        "--requeue", f"--output={tmp_path / 'job.out'}", "--open-mode=append",
        f"--export=ALL,RLSPEC_RUN_DIR={run},RLSPEC_REQUEUE_LEAD_S=100", str(script))
    job = out.strip().split(";")[0]
    states = slurm_cluster.wait_finished([job], timeout=300)
    assert states[job] == "COMPLETED", (states, (tmp_path / "job.out").read_text())
    assert (run / "starts").read_text().split("\n")[:2] == ["start 0", "start 1"]
    history = slurm_cluster.run("sacct", "-n", "-X", "-P", "--duplicates", "-o", "JobID,State",
                                "-j", job)
    assert "REQUEUED" in history, history
    log = (run / "logs" / "probe.log").read_text()
    assert "requeued" in log and "(restart 1 of at most 1)" in log, log
    assert "requeued 1 time(s) already" in (tmp_path / "job.out").read_text()


def test_a_colocated_rl_job_runs_trainer_and_engine_on_one_node(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """rollout.placement colocated: the RL job asks Slurm for the trainer's one node and runs
    its rollout and trainer steps there together (srun --overlap; the job holds one CPU per
    node task, so without it the second step would wait for the first to end), the engine
    sleeping through each trainer step."""
    bundle = tmp_path / "tiny"
    result = rlspec("compile", "examples/tiny/spec.yaml", "-o", bundle, *ON_SLURM, *SHORT,
                    "--set", "rollout.placement=colocated", "--set", "eval.enabled=false")
    assert result.returncode == 0, result.stderr
    result = rlspec("submit", bundle, env={"RLSPEC_ROLLOUT_BASE_PORT": str(free_ports(1))})
    assert result.returncode == 0, result.stderr
    ids = submitted(bundle)
    assert scontrol_job(slurm_cluster, ids["rl"])["NumNodes"] in ("1", "1-1")  # pending: a range
    states = slurm_cluster.wait_finished(list(ids.values()), timeout=400)
    assert all(state == "COMPLETED" for state in states.values()), (states, bundle / "logs")
    run = bundle / "runs" / "tiny"
    lines = [json.loads(x) for x in (run / "artifacts" / "rl" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    assert all(m["sleep_wake_seconds"] > 0 for m in lines)
    # The allocation and its job steps (the batch script, the rollout and trainer sruns) all
    # on one node, the two sruns at the same time.
    out = slurm_cluster.run("sacct", "-n", "-P", "-o", "JobID,NodeList,Start,End", "-j", ids["rl"])
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    assert len({row[1] for row in rows}) == 1, out
    sruns = [row for row in rows if re.fullmatch(r"\d+\.\d+", row[0])]
    assert len(sruns) == 2, out
    (_, _, start_a, end_a), (_, _, start_b, end_b) = sruns
    assert start_a < end_b and start_b < end_a, out  # they overlapped in time

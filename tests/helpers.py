"""Helpers several test files share: reading `rlspec status`, stand-ins for Slurm, finding a
run's processes, and embedded rollout servers."""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from compiler.processes import processes_mentioning

__all__ = ["AWAIT_ROLES", "HOLD", "SLURM_STUBS", "STARTED", "processes_mentioning", "rollout_servers", "status_rows",
           "write_stubs"]

REPO = Path(__file__).resolve().parents[1]


def status_rows(text: str) -> dict[str, list[str]]:
    """job → cells (job, id, state, log) of `rlspec status`'s table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 4 and cells[0] and cells[0] != "job":
            rows[cells[0]] = cells
    return rows


# Stand-ins that let a launch script run as if inside an allocation of RLSPEC_TEST_NODES nodes.
SLURM_STUBS = {
    # scontrol show hostnames: the allocation's nodes, node-0 … node-(N-1).
    "scontrol": 'for ((i = 0; i < RLSPEC_TEST_NODES; i++)); do echo "node-$i"; done',
    # srun: one task per node of --nodelist, SLURM_PROCID = index, like Slurm would.
    "srun": """
[[ -n ${RECORD:-} ]] && echo "$*" >> "$RECORD/srun"  # the step's options and command
hosts=""; while [[ $1 == --* ]]; do case $1 in --nodelist=*) hosts=${1#--nodelist=};; esac; shift; done
IFS=, read -r -a H <<< "$hosts"; i=0
# Like srun, a SIGTERM to the step is passed on to its tasks.
trap 'kill $(jobs -p) 2>/dev/null; wait; exit 143' TERM
for h in "${H[@]}"; do SLURM_PROCID=$i SLURMD_NODENAME=$h "$@" & i=$((i+1)); done; wait""",
}

# Stand-ins for a job's long-running roles (torchrun, a vLLM server) end this way: never by
# themselves, only when the launch script stops them or their parent is gone, so that the
# driver's end, not a timer, decides when the job ends.
HOLD = 'while kill -0 "$PPID" 2>/dev/null; do sleep 0.1; done'
# A role stand-in marks that it has started (after recording what it was given) ...
STARTED = 'touch "$RECORD/started.${SLURMD_NODENAME:-local}.$$"'
# ... and the driver's stand-in ends the job once RLSPEC_TEST_ROLES of them have.
AWAIT_ROLES = ('shopt -s nullglob; started=("$RECORD"/started.*); '
               'while (( ${#started[@]} < RLSPEC_TEST_ROLES )); do '
               'sleep 0.05; started=("$RECORD"/started.*); done')


def write_stubs(bin_dir: Path, stubs: Mapping[str, str]) -> Path:
    """Executable bash scripts named after ``stubs``' keys in ``bin_dir`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _wait_url(proc: subprocess.Popen[str], log: Path, timeout: float = 60.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("serving on "):
                return line.split()[-1]
        if proc.poll() is not None:
            break
    raise AssertionError(f"server did not start (rc={proc.poll()}):\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def rollout_servers(model_dir: Path, logs: Path, count: int, *extra: str) -> Iterator[list[str]]:
    """``count`` embedded rollout servers (``runtime.rollout.server``) of ``model_dir`` on
    127.0.0.1, server i with ``--seed i`` and its log ``logs/server<i>.log``; yields their
    URLs, and stops them (only these processes, by pid) on exit, which must be clean."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = []
    for i in range(count):
        cmd = [sys.executable, "-m", "runtime.rollout.server", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", "0", "--seed", str(i), *extra]
        with (logs / f"server{i}.log").open("w") as err:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=err, text=True))
    try:
        yield [_wait_url(p, logs / f"server{i}.log") for i, p in enumerate(procs)]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                rc = p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
                rc = None
            assert p.stdout is not None
            p.stdout.close()
            assert rc == 0, "the server did not shut down cleanly on SIGTERM"


def launch_job(bundle: Path, job: str, run_dir: Path,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run one job of a local bundle as the local runner does (``jobs/<job>/launch.sh``, this
    interpreter's environment, none of an enclosing Slurm job or run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RLSPEC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    bin_dir = Path(sys.executable).parent
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", RLSPEC_RUN_DIR=str(run_dir),
               RLSPEC_PYTHON=sys.executable, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run(["bash", str(bundle / "jobs" / job / "launch.sh")], env=env,
                          capture_output=True, text=True, timeout=timeout)

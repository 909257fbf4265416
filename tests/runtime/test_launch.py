"""``runtime.launch``: torchrun's process contract with ``file://`` rendezvous."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A rank: records its environment; rank 1 fails with status 7 when told to, the others wait.
RANK = """
import json, os, sys, time
out = sys.argv[1]
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
               "LOCAL_WORLD_SIZE", "GROUP_RANK", "RLSPEC_RENDEZVOUS")} | {"pid": os.getpid(),
               "argv": sys.argv[2:]}, f)
if sys.argv[2] == "fail" and os.environ["RANK"] == "3":
    sys.exit(7)
if sys.argv[2] in ("fail", "wait"):
    time.sleep(60)
"""


def _launch(tmp_path: Path, *args: str) -> subprocess.Popen:
    (tmp_path / "rank_mod.py").write_text(RANK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "runtime.launch", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().split()[2] != "Z"


def test_ranks_get_torchrun_environment(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", "1",
                   "--rendezvous", "rdzv/file", "-m", "rank_mod", str(tmp_path), "ok",
                   "--config", "x")
    assert proc.wait(timeout=60) == 0, proc.stderr.read()  # type: ignore[union-attr]
    seen = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (2, 3)}
    assert [seen[r]["LOCAL_RANK"] for r in (2, 3)] == ["0", "1"]
    assert {s["WORLD_SIZE"] for s in seen.values()} == {"4"}
    assert {s["GROUP_RANK"] for s in seen.values()} == {"1"}
    assert {s["RLSPEC_RENDEZVOUS"] for s in seen.values()} == {f"file://{ROOT / 'rdzv' / 'file'}"}
    assert seen[2]["argv"] == ["ok", "--config", "x"]  # the module's own flags pass through


def test_the_first_failure_stops_the_other_ranks(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", "1",
                   "-m", "rank_mod", str(tmp_path), "fail")
    assert proc.wait(timeout=60) == 7
    survivor = json.loads((tmp_path / "rank2.json").read_text())
    assert survivor["RLSPEC_RENDEZVOUS"] is None  # no --rendezvous: none set
    assert not _alive(survivor["pid"])


def test_sigterm_reaches_every_rank(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "--nproc-per-node", "2", "-m", "rank_mod", str(tmp_path), "wait")
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"rank{r}.json").is_file() for r in (0, 1)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    pids = [json.loads((tmp_path / f"rank{r}.json").read_text())["pid"] for r in (0, 1)]
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    assert not any(_alive(p) for p in pids)


def test_bad_command_lines_are_usage_errors(tmp_path: Path) -> None:
    for args in (["--nproc-per-node", "2"], ["--nnodes", "1", "--node-rank", "1", "-m", "x"]):
        proc = _launch(tmp_path, *args)
        assert proc.wait(timeout=60) == 2

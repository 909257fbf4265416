"""A real Slurm 22.05 cluster on loopback for the tests of `rlspec submit/status/cancel`.

`slurm_cluster` (session scope) starts, in a temporary directory and as the current user
(root: Slurm's daemons need it), every daemon a cluster with accounting has:

    munged     its own key and socket (Slurm is told the socket: AuthInfo=socket=...)
    mariadbd   a private data directory, TCP on 127.0.0.1 only, a random password
    slurmdbd   accounting, so that `sacct` answers for finished jobs
    slurmctld  the controller
    slurmd ×2  two compute nodes on this host (the RL job of the tiny spec asks for 2 nodes:
               one for the rollout engine, one for the trainer)

Every TCP port is free at start (chosen at runtime) and bound to 127.0.0.1: the slurm.conf
says `CommunicationParameters=NoCtldInAddrAny,NoInAddrAny`, with which slurmctld binds its
SlurmctldHost address and slurmd/slurmdbd/srun bind the address of *the host name*; so
those daemons run in a UTS namespace of their own whose host name is `localhost`
(`unshare --uts`), which resolves to 127.0.0.1 on every machine. No cgroups are needed:
proctrack/linuxproc and task/none.

The binaries come from Debian (`make sysdeps`: slurm-wlm slurmdbd munge mariadb-server);
where one is missing the fixture fails (it does not skip) with that advice. Teardown
cancels the cluster's jobs, then stops the daemons it started, by pid.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runtime.ports import free_ports

PARTITION = "debug"
# NodeName is a loopback address: the RL job's rollout engine serves on its node's name,
# which must resolve to loopback (slurmd itself is reached through NodeAddr and Port).
NODES = ("127.0.0.1", "127.0.0.2")
CLUSTER_NAME = "rlspectest"
BINARIES = ("munged", "munge", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld",
            "slurmd", "sbatch", "srun", "squeue", "sacct", "scontrol", "scancel", "sinfo",
            "unshare", "hostname", "ss")
START_TIMEOUT_S = 90


@dataclass
class SlurmCluster:
    """A running cluster: its directory, its slurm.conf, and the daemons' processes."""

    root: Path
    conf: Path
    nodes: tuple[str, ...] = NODES
    partition: str = PARTITION
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "SLURM_CONF": str(self.conf)})
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): "
                                 f"{result.stderr.strip()}")
        return result.stdout

    def squeue(self, ids: list[str]) -> dict[str, str]:
        """id → state of the jobs slurmctld still knows."""
        out = self.run("squeue", "-h", "-o", "%i %T", "-j", ",".join(ids), check=False)
        return dict(line.split()[:2] for line in out.splitlines() if line.strip())

    def sacct(self, ids: list[str], fields: str = "JobID,State") -> dict[str, list[str]]:
        """id → the other fields, from accounting (the allocation's line, not its steps)."""
        out = self.run("sacct", "-n", "-X", "-P", "-o", fields, "-j", ",".join(ids))
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        return {row[0]: row[1:] for row in rows}

    def wait_finished(self, ids: list[str], timeout: float = 240) -> dict[str, str]:
        """Wait until accounting records every job as ended; id → state (first word)."""
        deadline = time.monotonic() + timeout
        while True:
            states = {i: row[0].split()[0] for i, row in self.sacct(ids).items()}
            if all(states.get(i) not in (None, "PENDING", "RUNNING", "REQUEUED", "SUSPENDED")
                   for i in ids):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs still not finished after {timeout:.0f} s: {states}; "
                                     f"squeue: {self.run('squeue', check=False)}")
            time.sleep(1)

    def wait_gone_from_squeue(self, ids: list[str], timeout: float = 90) -> None:
        """Wait until slurmctld has purged the jobs (MinJobAge): only sacct knows them."""
        deadline = time.monotonic() + timeout
        while self.squeue(ids):
            if time.monotonic() > deadline:
                raise AssertionError(f"squeue still lists {self.squeue(ids)}")
            time.sleep(1)

    def listening_sockets(self) -> list[tuple[str, str, int]]:
        """(local address, process name, pid) of every TCP socket that a daemon of this
        cluster, a process below one, or a process of its jobs (slurmstepd, srun, the jobs'
        own servers: their environment names this cluster's SLURM_CONF) listens on."""
        pids = _descendants({p.pid for p in self.procs.values()}) | _with_env(
            f"SLURM_CONF={self.conf}")
        out = subprocess.run(["ss", "-H", "-ltnp"], capture_output=True, text=True,
                             check=True).stdout
        found = []
        for line in out.splitlines():
            parts = line.split()
            local = parts[3]
            for name, pid in _ss_users(line):
                if pid in pids:
                    found.append((local, name, pid))
        return found


def _ss_users(line: str) -> list[tuple[str, int]]:
    """The (name, pid) pairs of an `ss -p` line: users:(("slurmd",pid=12,fd=5),...)."""
    users = []
    if "users:((" not in line:
        return users
    for chunk in line.split("users:((", 1)[1].split("),("):
        name, _, rest = chunk.partition(",pid=")
        users.append((name.strip('"'), int(rest.split(",")[0])))
    return users


def _with_env(entry: str) -> set[int]:
    found = set()
    needle = entry.encode() + b"\0"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes() + b"\0":
                    found.add(int(proc.name))
            except OSError:
                continue
    return found


def _descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def _real_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 2048


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


def _wait(what: str, ready, procs: dict[str, subprocess.Popen], log: Path,
          timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name, proc in procs.items():
            if proc.poll() is not None:
                stdout = log.parent / f"{name}.stdout"
                raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for "
                                   f"{what}; {log}:\n{_tail(log)}\n{stdout}:\n{_tail(stdout)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s; {log}:\n{_tail(log)}")
        time.sleep(0.3)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _loopback_host(cmd: list[str]) -> list[str]:
    """cmd in a UTS namespace whose host name is `localhost` (see the module docstring)."""
    return ["unshare", "--uts", "sh", "-c", 'hostname localhost && exec "$@"', "sh", *cmd]


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


def _start(cluster: SlurmCluster, name: str, cmd: list[str], env: dict[str, str]) -> None:
    out = (cluster.root / "log" / f"{name}.stdout").open("ab")
    cluster.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
    out.close()


def _stop(cluster: SlurmCluster) -> None:
    """Cancel the cluster's jobs, then stop the daemons in reverse order of start, by pid."""
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        with_jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).split()
        if with_jobs:
            cluster.run("scancel", *with_jobs, check=False)
            deadline = time.monotonic() + 30
            while (cluster.run("squeue", "-h", "-t", "running,completing", "-o", "%i",
                               check=False).strip() and time.monotonic() < deadline):
                time.sleep(0.5)
    for proc in reversed(list(cluster.procs.values())):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def start_cluster(root: Path) -> SlurmCluster:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.fail(
            f"Slurm test cluster: {', '.join(missing)} not found. Install the Debian packages "
            "with `make sysdeps` (slurm-wlm slurmdbd munge mariadb-server iproute2), or "
            "deselect these tests with `-m 'not slurm'`.", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("Slurm test cluster: slurmd must run as root (run the tests as root, or "
                    "deselect them with `-m 'not slurm'`)", pytrace=False)

    for sub in ("log", "state", "spool", "munge-key", "munge-run", "db"):
        (root / sub).mkdir()
    (root / "munge-key").chmod(0o700)
    # munged wants its socket's directory (and, without --force, every parent) searchable
    # by everyone; pytest's base directory is 0700.
    (root / "munge-run").chmod(0o755)
    conf = root / "slurm.conf"
    cluster = SlurmCluster(root=root, conf=conf)
    base = free_ports(5)  # below the ephemeral range: free until the daemons bind them
    ctld_port, slurmd_port, node2_port, dbd_port, db_port = range(base, base + 5)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env.pop("SLURM_JOB_ID", None)

    try:
        # munge: a private key and socket.
        key = root / "munge-key" / "munge.key"
        _write(key, "", 0o600)
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        munge_socket = root / "munge-run" / "munge.socket"
        _start(cluster, "munged", [
            "munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
            f"--pid-file={root / 'munge-run' / 'munged.pid'}",
            f"--log-file={cluster.log('munged')}", f"--seed-file={root / 'munge-key' / 'seed'}",
        ], env)

        def munge_ok() -> bool:
            return munge_socket.exists() and subprocess.run(
                ["munge", "-n", "-S", str(munge_socket)], capture_output=True).returncode == 0

        _wait("munged", munge_ok, cluster.procs, cluster.log("munged"))

        # MariaDB: a new data directory, TCP on 127.0.0.1 only; the database and a user for
        # slurmdbd are created by --init-file on start.
        data = root / "db" / "data"
        init = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {init.stdout[-2000:]}"
                               f"{init.stderr[-2000:]}")
        password = secrets.token_hex(16)
        _write(root / "db" / "init.sql", (
            "CREATE DATABASE IF NOT EXISTS slurm_acct_db;\n"
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';\n"
        ), 0o600)
        _start(cluster, "mariadbd", [
            "mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
            f"--socket={root / 'db' / 'mysqld.sock'}", "--bind-address=127.0.0.1",
            f"--port={db_port}", f"--pid-file={root / 'db' / 'mysqld.pid'}",
            "--skip-name-resolve", f"--init-file={root / 'db' / 'init.sql'}",
            f"--log-error={cluster.log('mariadbd')}", "--innodb-buffer-pool-size=64M",
            "--innodb-lock-wait-timeout=900",
        ], env)
        _wait("mariadbd", lambda: "ready for connections" in _tail(cluster.log("mariadbd"), 400)
              and _accepts(db_port), cluster.procs, cluster.log("mariadbd"))

        # slurmdbd (it reads slurmdbd.conf next to SLURM_CONF; the file must be 0600).
        _write(root / "slurmdbd.conf", "\n".join([
            "AuthType=auth/munge",
            f"AuthInfo=socket={munge_socket}",
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={dbd_port}",
            # Bind the host name's address (localhost in the namespace), not INADDR_ANY.
            "CommunicationParameters=NoInAddrAny",
            "SlurmUser=root",
            f"LogFile={cluster.log('slurmdbd')}",
            f"PidFile={root / 'slurmdbd.pid'}",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={db_port}",
            "StorageUser=slurm",
            f"StoragePass={password}",
            "StorageLoc=slurm_acct_db",
            "",
        ]), 0o600)
        _start(cluster, "slurmdbd", _loopback_host(["slurmdbd", "-D"]), env)
        _wait("slurmdbd", lambda: _accepts(dbd_port), cluster.procs, cluster.log("slurmdbd"))

        cpus = os.cpu_count() or 1
        memory = max(256, _real_memory_mb() // 2)
        node_lines = [
            f"NodeName={NODES[0]} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} "
            "State=UNKNOWN",
            # Both slurmd bind 127.0.0.1 (the host name's address): the second on its own Port.
            f"NodeName={NODES[1]} NodeAddr=127.0.0.1 Port={node2_port} CPUs={cpus} "
            f"RealMemory={memory} State=UNKNOWN",
        ]
        _write(conf, "\n".join([
            f"ClusterName={CLUSTER_NAME}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}/slurmd-%n",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={cluster.log('slurmctld')}",
            f"SlurmdLogFile={root / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=localhost",
            f"AccountingStoragePort={dbd_port}",
            # With auth/munge, the socket of the munged that slurmdbd trusts.
            f"AccountingStoragePass={munge_socket}",
            "JobCompType=jobcomp/none",
            # Finished jobs leave slurmctld after ~2 s: `rlspec status` then needs sacct.
            "MinJobAge=2",
            "KillWait=5",
            "InactiveLimit=0",
            *node_lines,
            f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES "
            "MaxTime=INFINITE State=UP",
            "",
        ]))
        _start(cluster, "slurmctld", _loopback_host(["slurmctld", "-D"]), env)
        _wait("slurmctld", lambda: _accepts(ctld_port), cluster.procs, cluster.log("slurmctld"))
        for node in NODES:
            _start(cluster, f"slurmd-{node}", _loopback_host(["slurmd", "-D", "-N", node]), env)

        def nodes_idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in out.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in NODES)

        _wait("both nodes idle in sinfo", nodes_idle, cluster.procs, cluster.log("slurmctld"))
    except BaseException:
        _stop(cluster)
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        _stop(cluster)

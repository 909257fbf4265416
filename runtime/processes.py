"""The processes of a job: each dies with its launcher, and one can tell whether another lives.

The RL job's launch script (``jobs/rl/launch.sh``) starts the engines, the trainer and the
driver; each calls ``die_with_parent`` so that killing the script leaves no orphan, and the
driver reads the engines' URLs the script exports (``rollout_endpoints``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import threading
import time

from runtime.errors import JobError

__all__ = ["die_with_parent", "pid_alive", "process_record", "record_alive", "rollout_endpoints"]


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (no orphans when a launch
    script is killed); elsewhere a watchdog thread polls the parent pid."""
    parent = os.getppid()
    if parent == 1:  # already orphaned (the launch script stopped while this one started)
        os.kill(os.getpid(), signal.SIGTERM)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent or parent == 1:  # the parent died before prctl
                os.kill(os.getpid(), signal.SIGTERM)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def rollout_endpoints(env: dict[str, str] | None = None) -> list[str]:
    """``RLSPEC_ROLLOUT_ENDPOINTS``: the comma-separated engine URLs ``jobs/rl/launch.sh`` exports."""
    env = dict(os.environ if env is None else env)
    raw = [e.strip() for e in env.get("RLSPEC_ROLLOUT_ENDPOINTS", "").split(",") if e.strip()]
    if not raw:
        raise JobError("RLSPEC_ROLLOUT_ENDPOINTS is not set: run the RL job through its launch.sh")
    return raw


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_record() -> dict[str, object]:
    """This process as another can find it again: pid, start time and host (a pid alone may
    be reused by then)."""
    import socket

    import psutil

    me = psutil.Process()
    return {"pid": me.pid, "started": me.create_time(), "host": socket.gethostname()}


def record_alive(record: dict[str, object], what: str = "process") -> str:
    """Why the process of a ``process_record`` cannot be reached from here ("" while it
    lives on this node)."""
    import socket

    import psutil

    if record["host"] != socket.gethostname():
        return f"the {what} runs on {record['host']}, not on this node"
    try:
        alive = psutil.Process(int(record["pid"])).create_time() == record["started"]
    except psutil.Error:
        alive = False
    return "" if alive else f"the {what} (pid {record['pid']}) has ended"


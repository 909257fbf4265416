"""Finding and stopping processes (psutil): the process tree of a local job, and the
processes whose command line names a run (the tests use it to check nothing is left behind)."""

from __future__ import annotations

import contextlib
import signal

import psutil


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid``, parents first (empty when ``pid`` is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    """Send ``sig`` to each of ``procs``, skipping those already gone or not ours."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


def stop_tree(pid: int, timeout_s: float) -> bool:
    """SIGTERM to process ``pid`` and every process below it, then, after at most
    ``timeout_s`` (sooner once those below it are gone), SIGKILL to whatever is left
    (including processes started meanwhile); then wait for ``pid`` itself (reaped when it is
    a child of ours). False, and nothing signalled, when there is no process ``pid``."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return False
    tree = descendants(pid)
    signal_all([root, *tree], signal.SIGTERM)
    psutil.wait_procs(tree, timeout=timeout_s)
    signal_all([*descendants(pid), *tree, root], signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):
        root.wait(timeout=10)
    return True


def processes_mentioning(text: str) -> list[int]:
    """Ids of live processes whose command line contains ``text``."""
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if text in " ".join(cmdline):
            pids.append(proc.pid)
    return pids

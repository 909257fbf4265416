"""``torchrun`` for ``file://`` rendezvous: start this node's ranks of a distributed job.

    python -m runtime.launch --nnodes N --nproc-per-node P --node-rank R \\
        [--rendezvous FILE] -m MODULE ARGS...

Used by ``jobs/rl/train.sh`` for ``cluster.devices: cpu``, and by ``jobs/rl/rollout.sh`` to
run several embedded engine replicas on a node (each serves port + ``LOCAL_RANK``). torchrun's rendezvous store is a
TCP server listening on every interface of the master node; CPU runs (tests, CI, smoke tests
on a shared login node) rendezvous through a file on the shared run directory instead, and
nothing listens. GPU runs use torchrun itself.

Each of the P processes gets torchrun's environment (``RANK`` = R·P + i, ``LOCAL_RANK`` = i,
``WORLD_SIZE`` = N·P, ``LOCAL_WORLD_SIZE`` = P, ``GROUP_RANK`` = R) plus, with
``--rendezvous``, ``RLSPEC_RENDEZVOUS=file://FILE``, which ``runtime.jobs.train`` passes to
``init_process_group``. As torchrun does, the launcher ends with the first failing rank's
status after stopping the others (SIGTERM, then SIGKILL after a grace period), and forwards
SIGTERM / SIGINT to its ranks.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

GRACE_S = 10.0


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float = GRACE_S) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(module: str, args: Sequence[str], *, nnodes: int, nproc_per_node: int,
           node_rank: int, rendezvous: str | None = None) -> int:
    """Run this node's ranks of ``python -m module args``; the first failure's status, else 0."""
    world = nnodes * nproc_per_node
    procs: list[subprocess.Popen[bytes]] = []
    for local in range(nproc_per_node):
        env = {**os.environ, "RANK": str(node_rank * nproc_per_node + local),
               "LOCAL_RANK": str(local), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(nproc_per_node), "GROUP_RANK": str(node_rank)}
        if rendezvous:
            env["RLSPEC_RENDEZVOUS"] = f"file://{os.path.abspath(rendezvous)}"
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env))

    def forward(signum: int, frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((c for c in codes if c not in (None, 0)), None)
            if failed is not None:
                _stop(procs)
                return failed if failed > 0 else 128 - failed  # -15 → 143, as a shell reports
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        _stop(procs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                 usage="%(prog)s [options] -m MODULE [ARGS...]")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--nproc-per-node", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--rendezvous", help="a file on a directory every node shares")
    # as for python itself, everything after ``-m MODULE`` belongs to the module
    if "-m" not in argv or argv.index("-m") == len(argv) - 1:
        ap.error("-m MODULE is required")
    cut = argv.index("-m")
    ns = ap.parse_args(argv[:cut])
    if not 0 <= ns.node_rank < ns.nnodes:
        ap.error(f"--node-rank {ns.node_rank} is not in 0..{ns.nnodes - 1}")
    from runtime.processes import die_with_parent

    die_with_parent()  # the launch script's stop reaches the ranks through this process
    return launch(argv[cut + 1], argv[cut + 2:], nnodes=ns.nnodes,
                  nproc_per_node=ns.nproc_per_node, node_rank=ns.node_rank,
                  rendezvous=ns.rendezvous)


if __name__ == "__main__":
    sys.exit(main())

"""Free TCP ports for the servers a local run starts (``cluster.scheduler: local``).

A port chosen now and bound later by another process (an engine replica loads its model
first) must stay free meanwhile. One asked of the kernel (``bind`` to port 0) does not: it
lies in the ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``), which every
outgoing connection of the machine draws from, and Linux gives ``bind(0)`` the ports of one
parity and ``connect`` those of the other (odd and even with the default range), so the
port after the one ``bind(0)`` gave (a second replica's) is the very kind the next outgoing
connection takes. Ports below the range are taken only by a server that asks for one by
number, so :func:`free_ports` draws its block there, at random (two runs started together
pick different blocks), above the fixed ports the rendered jobs bind (``LOWEST``), and checks
that each is free.
"""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

__all__ = ["ephemeral_range", "free_ports"]

# Above the fixed ports of the rendered jobs (compiler.render: the Megatron rendezvous 29500,
# vLLM's data-parallel RPC 13345, the engines' 8000 on Slurm) and of common services.
LOWEST = 30000
HIGHEST = 65535
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral ports (Linux's default where the file cannot be read)."""
    try:
        low, high = (int(x) for x in RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _free(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1, host: str = "127.0.0.1", *,
               rng: random.Random | None = None, attempts: int = 1000) -> int:
    """The first of ``count`` consecutive ports on ``host``, each free now, from ``LOWEST``
    up and outside the ephemeral range (module doc; inside it only where a tuned range
    leaves no room outside)."""
    low, high = ephemeral_range()
    outside = [*range(LOWEST, low - count + 1), *range(high + 1, HIGHEST - count + 2)]
    starts = outside or range(LOWEST, HIGHEST - count + 2)
    if not starts:
        raise OSError(f"no block of {count} ports from {LOWEST} to {HIGHEST}")
    rng = rng or random.SystemRandom()
    for _ in range(attempts):
        base = rng.choice(starts)
        if all(_free(base + i, host) for i in range(count)):
            return base
    raise OSError(f"no {count} consecutive free ports on {host} in {attempts} tries")


if __name__ == "__main__":  # the launch scripts: python -m runtime.ports COUNT
    print(free_ports(int(sys.argv[1]) if len(sys.argv) > 1 else 1))

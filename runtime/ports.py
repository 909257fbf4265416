"""Free TCP ports for the servers a local run starts (``cluster.scheduler: local``).

A port chosen now and bound later by another process (an engine replica loads its model
first) must stay free meanwhile. One asked of the kernel (``bind`` to port 0) does not: it
lies in the ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``), which every
outgoing connection of the machine draws from, and Linux gives ``bind(0)`` the odd ports of
it and ``connect`` the even ones, so the port after an odd one (a second replica's) is the
very kind the next outgoing connection takes. Ports below the range are taken only by a
server that asks for them by number, so :func:`free_ports` draws its block there, at
random (two runs started together pick different blocks), and checks that each is free.
"""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

__all__ = ["ephemeral_range", "free_ports"]

LOWEST = 10000  # below: well-known and registered services (Slurm's 6817, MySQL's 3306)
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
    """The first of ``count`` consecutive ports on ``host``, each free now, outside the
    ephemeral range (module doc)."""
    low, high = ephemeral_range()
    starts = [p for p in range(LOWEST, HIGHEST - count + 2)
              if p + count - 1 < low or p > high]
    if not starts:  # an ephemeral range over every port: any block is as good
        starts = list(range(LOWEST, HIGHEST - count + 2))
    rng = rng or random.SystemRandom()
    for _ in range(attempts):
        base = rng.choice(starts)
        if all(_free(base + i, host) for i in range(count)):
            return base
    raise OSError(f"no {count} consecutive free ports on {host} in {attempts} tries")


if __name__ == "__main__":  # the launch scripts: python -m runtime.ports COUNT
    print(free_ports(int(sys.argv[1]) if len(sys.argv) > 1 else 1))

"""runtime.ports: the engines' ports of a local run stay free until the engines bind them."""

from __future__ import annotations

import random
import socket
import subprocess
import sys

from compiler.render import DP_RPC_PORT, MASTER_PORT, ROLLOUT_BASE_PORT
from runtime.ports import LOWEST, ephemeral_range, free_ports


def test_a_block_is_free_and_outside_the_ephemeral_range() -> None:
    """No outgoing connection and no ``bind(0)`` can take the block meanwhile (the CI failure:
    ``bind(0)``'s odd port + 1 is the kind of port ``connect`` takes)."""
    low, high = ephemeral_range()
    assert low - 3 >= LOWEST or high < 65535 - 3  # room outside on this machine
    for _ in range(20):
        base = free_ports(3)
        assert base >= LOWEST
        assert base + 2 < low or base > high
        socks = [socket.socket() for _ in range(3)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))  # each of them binds
        finally:
            for s in socks:
                s.close()


def test_a_block_with_a_taken_port_is_passed_over() -> None:
    """The draw is retried while any port of the block is in use."""
    first = free_ports(2, rng=random.Random(7))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first + 1))
        taken.listen()
        again = free_ports(2, rng=random.Random(7))  # the same draws: the first one is taken
    assert again != first
    assert not {again, again + 1} & {first + 1}


def test_the_launch_scripts_command_prints_a_base_port() -> None:
    out = subprocess.run([sys.executable, "-m", "runtime.ports", "2"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert int(out) >= LOWEST


def test_no_block_meets_a_port_the_rendered_jobs_bind() -> None:
    """A local GPU run binds the Megatron rendezvous port at once, the engines after loading:
    the engines' block must not be able to hold it (nor vLLM's data-parallel RPC port)."""
    assert max(MASTER_PORT, DP_RPC_PORT, ROLLOUT_BASE_PORT) < LOWEST

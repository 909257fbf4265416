"""``runtime.seeds``: the seeds of the RL driver's sampling requests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from runtime.seeds import SEED_BITS, request_seed

ROOT = Path(__file__).resolve().parents[2]
KEY = (0, ("17", 4, "a prompt"), 8)


def test_the_seed_is_the_same_in_every_process() -> None:
    """Driver processes of one run (first session, resumed session) derive the same seeds,
    whatever Python's per-process string hashing."""
    code = ("from runtime.seeds import request_seed; "
            f"print(request_seed(1234, 'rollout', 3, {KEY!r}))")
    got = set()
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, timeout=60)
        got.add(int(out.stdout))
    assert got == {request_seed(1234, "rollout", 3, KEY)}


def test_each_input_changes_the_seed_and_seed_plus_j_fits_int64() -> None:
    base = request_seed(1234, "rollout", 3, KEY)
    others = [request_seed(1235, "rollout", 3, KEY), request_seed(1234, "eval", 3, KEY),
              request_seed(1234, "rollout", 4, KEY),
              request_seed(1234, "rollout", 3, (1, *KEY[1:])),
              request_seed(1234, "rollout", 3, (0, ("17", 4), 8)),
              request_seed(1234, "rollout", 3, (0, KEY[1], 16))]
    assert base not in others and len(set(others)) == len(others)
    for s in [base, *others]:
        assert 0 <= s < 2**SEED_BITS and s + 4096 < 2**63  # sample j uses seed + j

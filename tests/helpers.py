"""Helpers several test folders share: reading `rlspec status`, stand-ins for Slurm, and
finding a run's processes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from compiler.processes import processes_mentioning

__all__ = ["SLURM_STUBS", "processes_mentioning", "status_rows", "write_stubs"]


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
hosts=""; while [[ $1 == --* ]]; do case $1 in --nodelist=*) hosts=${1#--nodelist=};; esac; shift; done
IFS=, read -r -a H <<< "$hosts"; i=0
for h in "${H[@]}"; do SLURM_PROCID=$i SLURMD_NODENAME=$h "$@" & i=$((i+1)); done; wait""",
}


def write_stubs(bin_dir: Path, stubs: Mapping[str, str]) -> Path:
    """Executable bash scripts named after ``stubs``' keys in ``bin_dir`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir

"""The device a single-process job runs its model on (``cluster.devices``).

SFT, the offline screen and the evaluations run one model in one process per node: on
``cluster.devices: gpu`` that is the node's first visible GPU (Slurm sets
CUDA_VISIBLE_DEVICES), on ``cpu`` the CPU. A GPU job on a node without CUDA stops at start
instead of running for hours on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from runtime.errors import JobError

__all__ = ["job_device"]


def job_device(spec: Mapping[str, Any]) -> torch.device:
    """``cuda:0`` for ``cluster.devices: gpu`` (a JobError without CUDA), else the CPU."""
    if spec["cluster"]["devices"] == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise JobError("cluster.devices is gpu but this node has no CUDA device "
                       "(torch.cuda.is_available() is False): run the job on a GPU node, or "
                       "set cluster.devices: cpu")
    return torch.device("cuda", 0)

"""SFT on the Megatron trainer (``train.backend: megatron``): ``jobs/sft/launch.sh`` starts two
CPU ranks with the Megatron-LM flags of ``jobs/sft/train.sh`` in the train layout, and the
HF ``policy_sft`` they write is the embedded SFT's (same batches, loss and optimizer) to float
precision, while the steps moved the weights by three orders of magnitude more."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import launch_job

pytestmark = pytest.mark.megatron

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SHORT = ["sft.steps=3", "sft.batch_size=8", "data.generator.train_size=300",
         "data.generator.eval_size=40"]
ON_CPU = ["train.backend=megatron", "model.architecture.moe.token_dispatcher=allgather",
          "cluster.gpus_per_node=2"]
LAYOUTS = {
    "dp2-ep2": (["train.parallelism.expert=2"], "world 2 (TP 1, PP 1, EP 2, ETP 1, DP 2)"),
    "tp2-sp-ep2": (["train.parallelism.tensor=2", "train.parallelism.sequence_parallel=true",
                    "train.parallelism.expert=2", "train.parallelism.expert_tensor=1"],
                   "world 2 (TP 2, PP 1, EP 2, ETP 1, DP 1)"),
}


def _compile(out: Path, edits: list[str]) -> Path:
    args = [str(VENV_BIN / "rlspec"), "compile", str(ROOT / "examples" / "tiny" / "spec.yaml"),
            "-o", str(out), "--force"]
    for edit in [*SHORT, *edits]:
        args += ["--set", edit]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with dataset, policy_init and the embedded trainer's policy_sft."""
    root = tmp_path_factory.mktemp("sft")
    bundle = _compile(root / "bundle", [])
    run_dir = root / "run"
    for job in ("data", "init", "sft"):
        done = launch_job(bundle, job, run_dir)
        assert done.returncode == 0, done.stderr
    return run_dir


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_sft_is_the_embedded_sft(embedded: Path, tmp_path: Path, layout: str) -> None:
    edits, world = LAYOUTS[layout]
    bundle = _compile(tmp_path / "bundle", [*ON_CPU, *edits])
    train_sh = (bundle / "jobs" / "sft" / "train.sh").read_text()
    assert "-m runtime.jobs.sft" in train_sh and "--global-batch-size 8" in train_sh
    run_dir = tmp_path / "run"
    for name in ("dataset", "policy_init"):
        shutil.copytree(embedded / "artifacts" / name, run_dir / "artifacts" / name)
    done = launch_job(bundle, "sft", run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "logs" / "sft.log").read_text()
    assert f"Megatron SFT: {world}" in log

    from runtime.megatron.hf_folder import FolderTensors

    got = dict(FolderTensors(run_dir / "artifacts" / "policy_sft"))
    want = dict(FolderTensors(embedded / "artifacts" / "policy_sft"))
    start = dict(FolderTensors(embedded / "artifacts" / "policy_init"))
    assert got.keys() == want.keys()
    moved = max((want[k] - start[k]).abs().max().item() for k in want)
    gap = max((got[k] - want[k]).abs().max().item() for k in want)
    assert moved > 1e-3 and gap < 1e-4, (moved, gap)
    # The same loss curve: each step's loss line matches the embedded job's.
    losses = [line.split("loss ")[1] for line in log.splitlines() if ": loss " in line]
    reference = [line.split("loss ")[1] for line in
                 (embedded / "logs" / "sft.log").read_text().splitlines() if ": loss " in line]
    assert losses and losses == reference
    assert torch.isfinite(torch.tensor([float(x) for x in losses])).all()

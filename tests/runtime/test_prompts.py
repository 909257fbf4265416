"""Prompt files as the spec documents them: ``data.train`` / ``data.eval`` are JSONL files.

A tiny bundle without a generator reads a train file (and an eval file) written here; the
jobs that read prompts (sft, screen, eval, the RL driver) run on it through their launch
scripts, as the scheduler runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.jobs.common import JobContext, is_complete
from runtime.prompts import split_file
from runtime.tasks.arithmetic import ArithmeticConfig, read_jsonl, write_dataset

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TRAIN_ROWS = 12


def _env(run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RLSPEC_")) and k not in ("RANK",)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RLSPEC_RUN_DIR"] = str(run_dir)
    env["RLSPEC_PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(ROOT)
    return env


def _launch(bundle: Path, job: str, run_dir: Path) -> None:
    proc = subprocess.run(["bash", str(bundle / "jobs" / job / "launch.sh")], env=_env(run_dir),
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"{job} failed:\n{proc.stderr}"


def _compile(out: Path, *overrides: str) -> Path:
    # This checkout's compiler (an installed `rlspec` may be another checkout's).
    sets = [arg for o in overrides for arg in ("--set", o)]
    subprocess.run([sys.executable, "-m", "compiler.main", "compile",
                    str(ROOT / "examples" / "tiny" / "spec.yaml"), "-o", str(out), *sets],
                   check=True, capture_output=True, text=True, timeout=60, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A train file and an eval file of the embedded task (not named train/eval.jsonl)."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "gen", ArithmeticConfig(seed=3, train_size=TRAIN_ROWS, eval_size=6,
                                                 max_digits=1))
    train, evals = root / "my-train.jsonl", root / "held-out.jsonl"
    train.write_text((root / "gen" / "train.jsonl").read_text())
    evals.write_text((root / "gen" / "eval.jsonl").read_text())
    return {"train": train, "eval": evals}


@pytest.fixture(scope="module")
def bundle(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(tmp_path_factory.mktemp("bundle") / "b", "data.generator=null",
                    f"data.train={files['train']}", f"data.eval={files['eval']}",
                    "sft.steps=2", "filters[0].samples_per_prompt=2")


@pytest.fixture(scope="module")
def run_dir(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    _launch(bundle, "init", run)
    return run


def test_split_file_of_a_file_and_of_a_folder(tmp_path: Path) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text("")
    assert split_file(file, "train") == file
    assert split_file(tmp_path, "train") == tmp_path / "train.jsonl"
    assert split_file(tmp_path, "eval") == tmp_path / "eval.jsonl"


def test_sft_and_screen_read_a_train_file(bundle: Path, run_dir: Path,
                                          files: dict[str, Path]) -> None:
    assert json.loads((bundle / "jobs" / "sft" / "config.json").read_text())["inputs"][
        "dataset"]["path"] == str(files["train"])
    _launch(bundle, "sft", run_dir)
    assert is_complete(run_dir / "artifacts" / "policy_sft")
    _launch(bundle, "screen", run_dir)
    lines = (run_dir / "artifacts" / "pass_rates" / "pass_rates.jsonl").read_text().splitlines()
    screened = [json.loads(line)["prompt_id"] for line in lines[1:]]
    assert screened == [r["id"] for r in read_jsonl(files["train"])]


def test_eval_before_reads_the_eval_file(bundle: Path, run_dir: Path,
                                        files: dict[str, Path]) -> None:
    _launch(bundle, "eval_before", run_dir)
    out = run_dir / "artifacts" / "eval_before"
    prompts = [json.loads(line)["prompt"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert prompts == [r["prompt"] for r in read_jsonl(files["eval"])]


def _ctx(bundle: Path, job: str) -> JobContext:
    return JobContext.load(bundle / "jobs" / job / "config.json", run_dir=bundle.parent,
                           bundle_dir=bundle, log_to_file=False)


def test_the_driver_reads_the_train_and_eval_files(bundle: Path, files: dict[str, Path]) -> None:
    from runtime.driver import RLDriver
    from runtime.prompts import eval_file

    driver = RLDriver(_ctx(bundle, "rl"))
    assert len(driver.rows) == TRAIN_ROWS
    assert [r["prompt"] for r in driver.rows.values()] == [
        r["prompt"] for r in read_jsonl(files["train"])]
    assert eval_file(driver.ctx) == files["eval"]  # the in-run evaluation's prompts



def _order(bundle: Path, shuffle_seed: int, train_seed: int) -> list[int]:
    """The first two epochs of prompts a fresh RL driver of ``bundle`` would draw."""
    from runtime.driver import RLDriver

    path = bundle / "jobs" / "rl" / "config.json"
    config = json.loads(path.read_text())
    config["spec"]["data"]["shuffle_seed"] = shuffle_seed
    config["spec"]["train"]["seed"] = train_seed
    ctx = JobContext(config, config_path=path, run_dir=bundle.parent, bundle_dir=bundle,
                     log_to_file=False)
    return RLDriver(ctx)._new_state().stream.take(2 * TRAIN_ROWS)


def test_the_prompt_order_follows_data_shuffle_seed_not_train_seed(bundle: Path) -> None:
    first = _order(bundle, 7, 1)
    assert _order(bundle, 7, 2) == first
    assert _order(bundle, 8, 1) != first
    assert sorted(first[:TRAIN_ROWS]) == sorted(first[TRAIN_ROWS:])  # every prompt each epoch

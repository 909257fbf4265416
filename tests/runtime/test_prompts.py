"""Prompt files as the spec documents them: ``data.train`` / ``data.eval`` are JSONL files.

A tiny bundle without a generator reads a train file (and an eval file) written here; the
jobs that read prompts (sft, screen, eval, the RL driver) run on it through their launch
scripts, as the scheduler runs them. Each file holds prompts longer than the tiny spec's
``data.max_prompt_tokens`` (16; its tokenizer is character-level), which every job drops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from runtime.files import read_jsonl
from runtime.jobs.common import JobContext, is_complete
from runtime.prompts import split_file
from runtime.tasks.arithmetic import ArithmeticConfig, write_dataset

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TRAIN_ROWS = 12  # that fit; the train file has OVERLONG more
OVERLONG = 2
LONG_PROMPT = "1+2+3+4+5+6+7+8+9="  # 18 tokens > data.max_prompt_tokens


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
    """A train file and an eval file of the embedded task (not named train/eval.jsonl), each
    with overlong prompts amid the others."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "gen", ArithmeticConfig(seed=3, train_size=TRAIN_ROWS, eval_size=6,
                                                 max_digits=1))
    train, evals = root / "my-train.jsonl", root / "held-out.jsonl"
    rows = list(read_jsonl(root / "gen" / "train.jsonl"))
    for i in range(OVERLONG):
        rows.insert(3 + 4 * i, {"id": 100 + i, "prompt": LONG_PROMPT, "answer": "45"})
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = list(read_jsonl(root / "gen" / "eval.jsonl"))
    rows.insert(2, {"id": 200, "prompt": LONG_PROMPT, "answer": "45"})
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": train, "eval": evals}


def _fitting(path: Path) -> list[dict]:
    return [r for r in read_jsonl(path) if r["prompt"] != LONG_PROMPT]


@pytest.fixture(scope="module")
def bundle(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(tmp_path_factory.mktemp("bundle") / "b", "data.generator=null",
                    f"data.train={files['train']}", f"data.eval={files['eval']}",
                    "sft.steps=2", "filters[0].samples_per_prompt=2")


@pytest.fixture(scope="module")
def run_dir(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run holding the initial policy and the SFT policy (what eval_before samples)."""
    run = tmp_path_factory.mktemp("run")
    _launch(bundle, "init", run)
    _launch(bundle, "sft", run)
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
    dropped = f"dropped {OVERLONG} of {TRAIN_ROWS + OVERLONG} train prompts longer than " \
        "data.max_prompt_tokens = 16 tokens"
    assert is_complete(run_dir / "artifacts" / "policy_sft")
    assert dropped in (run_dir / "logs" / "sft.log").read_text()
    _launch(bundle, "screen", run_dir)
    lines = (run_dir / "artifacts" / "pass_rates" / "pass_rates.jsonl").read_text().splitlines()
    screened = [json.loads(line)["prompt_id"] for line in lines[1:]]
    assert screened == [r["id"] for r in _fitting(files["train"])]
    assert dropped in (run_dir / "logs" / "screen.log").read_text()


def test_eval_before_reads_the_eval_file(bundle: Path, run_dir: Path,
                                        files: dict[str, Path]) -> None:
    _launch(bundle, "eval_before", run_dir)
    out = run_dir / "artifacts" / "eval_before"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    k = json.loads((out / "metrics.json").read_text())["samples_per_prompt"]  # eval.samples
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in _fitting(files["eval"])
                                              for _ in range(k)]
    assert [s["prompt_id"] for s in samples] == [r["id"] for r in _fitting(files["eval"])
                                                 for _ in range(k)]
    assert "dropped 1 of 7 eval prompts" in (run_dir / "logs" / "eval_before.log").read_text()


def _ctx(bundle: Path, job: str) -> JobContext:
    return JobContext.load(bundle / "jobs" / job / "config.json", run_dir=bundle.parent,
                           bundle_dir=bundle, log_to_file=False)


def _tokenizer(run_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir / "artifacts" / "policy_init")


def test_the_driver_reads_the_train_and_eval_files(bundle: Path, run_dir: Path,
                                                   files: dict[str, Path]) -> None:
    from runtime.driver import RLDriver

    driver = RLDriver(_ctx(bundle, "rl"))
    tokenizer = _tokenizer(run_dir)
    driver._drop_overlong(tokenizer)
    assert list(driver.rows.values()) == _fitting(files["train"])
    assert list(driver.rows) == [r["id"] for r in _fitting(files["train"])]
    assert driver._eval_prompts(tokenizer) == _fitting(files["eval"])  # the in-run evaluation


def test_an_empty_eval_split_is_refused_by_name(tmp_path: Path) -> None:
    """The eval jobs and the driver's in-run evaluation read the split through one function,
    which names the file when it is empty (before any model is loaded)."""
    from runtime.jobs.common import JobError
    from runtime.prompts import eval_rows

    split = tmp_path / "held-out.jsonl"
    ctx = SimpleNamespace(job="eval_before", inputs={"eval_dataset": {}},
                          input_path=lambda name: split)
    split.write_text("")
    with pytest.raises(JobError, match=f"the eval split {split} is empty"):
        eval_rows(ctx)  # type: ignore[arg-type]
    split.write_text('{"prompt": "1+1", "answer": "2"}\n')
    assert eval_rows(ctx) == {0: {"prompt": "1+1", "answer": "2"}}  # type: ignore[arg-type]


def test_drop_overlong_counts_tokens(run_dir: Path) -> None:
    import logging

    from runtime.jobs.common import JobError
    from runtime.prompts import drop_overlong

    tokenizer = _tokenizer(run_dir)
    log = logging.getLogger("test_prompts")
    rows = {"a": {"q": "12+3="}, "b": {"q": "1+2+3="}, 7: {"q": "9-9="}}
    data = {"prompt_key": "q", "max_prompt_tokens": 5}
    assert drop_overlong(rows, tokenizer, data, log, "train") == {"a": rows["a"], 7: rows[7]}
    assert drop_overlong(rows, tokenizer, {**data, "max_prompt_tokens": 6}, log, "x") == rows
    with pytest.raises(JobError, match="every prompt of the eval split"):
        drop_overlong(rows, tokenizer, {**data, "max_prompt_tokens": 3}, log, "eval")



def _order(bundle: Path, shuffle_seed: int, train_seed: int) -> list[int]:
    """The first two epochs of prompts a fresh RL driver of ``bundle`` would draw."""
    from runtime.driver import RLDriver

    path = bundle / "jobs" / "rl" / "config.json"
    config = json.loads(path.read_text())
    config["spec"]["data"]["shuffle_seed"] = shuffle_seed
    config["spec"]["train"]["seed"] = train_seed
    ctx = JobContext(config, config_path=path, run_dir=bundle.parent, bundle_dir=bundle,
                     log_to_file=False)
    return RLDriver(ctx)._new_state().stream.take(2 * (TRAIN_ROWS + OVERLONG))


def test_the_prompt_order_follows_data_shuffle_seed_not_train_seed(bundle: Path) -> None:
    first = _order(bundle, 7, 1)
    assert _order(bundle, 7, 2) == first
    assert _order(bundle, 8, 1) != first
    epoch = TRAIN_ROWS + OVERLONG
    assert sorted(first[:epoch]) == sorted(first[epoch:])  # every prompt each epoch

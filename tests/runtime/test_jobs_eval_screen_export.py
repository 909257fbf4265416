"""Job entry points `evaluate` (eval_before / eval_after), `screen` and `export`, run from a
compiled tiny bundle through their launch scripts, as the scheduler runs them.

The bundle is compiled with a short SFT and small splits; data → init → sft run once per
module. ``policy_final`` (the RL job's output) is stood in for by a copy of ``policy_sft``
with its ``.complete`` marker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from runtime.files import read_jsonl
from runtime.filters.offline_pass_rate import OfflinePassRate, ScreenResult
from runtime.jobs.common import COMPLETE_MARKER, is_complete, mark_complete
from runtime.rewards import ArithmeticVerifier

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
EVAL_SAMPLES = 2
PASS_RATES = "pass_rates.jsonl"
OVERRIDES = ("sft.steps=2", "data.generator.train_size=300", "data.generator.eval_size=60",
             f"eval.samples={EVAL_SAMPLES}", "eval.temperature=0.0")  # greedy, unless a test edits it


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
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{job} failed:\n{proc.stderr}"


def _config(bundle: Path, job: str) -> dict[str, Any]:
    return json.loads((bundle / "jobs" / job / "config.json").read_text())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    rlspec = VENV_BIN / "rlspec"
    cmd = [str(rlspec)] if rlspec.exists() else [sys.executable, "-m", "compiler.cli"]
    sets = [arg for o in OVERRIDES for arg in ("--set", o)]
    subprocess.run([*cmd, "compile", str(ROOT / "examples" / "tiny" / "spec.yaml"), "-o", str(out),
                    *sets], check=True, capture_output=True, text=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def run_dir(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    for job in ("data", "init", "sft"):
        _launch(bundle, job, run)
    final = run / "artifacts" / "policy_final"
    shutil.copytree(run / "artifacts" / "policy_sft", final)
    (final / COMPLETE_MARKER).unlink()
    mark_complete(final, job="test", artifact="policy_final")
    return run


# --------------------------------------------------------------------------- evaluate


def _check_eval(out: Path, dataset: Path, spec: dict[str, Any]) -> tuple[dict, list[dict]]:
    assert is_complete(out)
    assert {p.name for p in out.iterdir()} == {"metrics.json", "samples.jsonl", COMPLETE_MARKER}
    metrics = json.loads((out / "metrics.json").read_text())
    samples = list(read_jsonl(out / "samples.jsonl"))
    rows = list(read_jsonl(dataset / "eval.jsonl"))
    assert metrics["n_prompts"] == len(rows) == 60
    assert metrics["samples"] == len(samples) == len(rows) * EVAL_SAMPLES
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
    max_tokens = spec["eval"]["max_tokens"] or spec["rollout"]["max_tokens"]
    assert metrics["max_tokens"] == max_tokens
    assert 1 <= metrics["mean_response_tokens"] <= max_tokens
    verifier = ArithmeticVerifier()
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        assert set(s) >= {"prompt", "response", "answer", "correct"}
        assert s["correct"] == (verifier.score(s["prompt"], s["response"], s["answer"]) == 1.0)
        by_prompt.setdefault(s["prompt"], []).append(s)
    assert [r["prompt"] for r in rows] == list(by_prompt)
    assert {r["answer"] for r in rows} >= {s["answer"] for s in samples}
    # Per-difficulty accuracies over the prompts of each difficulty.
    diff = {r["prompt"]: str(r["difficulty"]) for r in rows}
    want: dict[str, list[bool]] = {}
    for s in samples:
        want.setdefault(diff[s["prompt"]], []).append(s["correct"])
    assert metrics["by_difficulty"] == {d: pytest.approx(sum(v) / len(v)) for d, v in want.items()}
    return metrics, samples


def test_evaluate_before_and_after_greedy_is_deterministic(bundle: Path, run_dir: Path) -> None:
    spec = _config(bundle, "eval_before")["spec"]
    assert spec["eval"]["temperature"] == 0.0
    dataset = run_dir / "artifacts" / "dataset"
    _launch(bundle, "eval_before", run_dir)
    before, before_samples = _check_eval(run_dir / "artifacts" / "eval_before", dataset, spec)
    assert before["policy"].endswith("policy_sft")
    # Greedy: the samples of one prompt agree, and the same weights give the same answers.
    for i in range(0, len(before_samples), EVAL_SAMPLES):
        group = before_samples[i:i + EVAL_SAMPLES]
        assert len({s["response"] for s in group}) == 1
    _launch(bundle, "eval_after", run_dir)  # policy_final is a copy of policy_sft
    after, after_samples = _check_eval(run_dir / "artifacts" / "eval_after", dataset, spec)
    assert after["policy"].endswith("policy_final")
    assert after_samples == before_samples
    assert after["accuracy"] == before["accuracy"]


def _variant(bundle: Path, tmp_path: Path, job: str, name: str,
             spec_edits: dict[str, Any]) -> Path:
    """A copy of ``job``'s config named ``name``, writing ``artifacts/<name>``, with
    ``spec_edits`` ({"section.key": value}) applied to its spec; returns its path."""
    config = _config(bundle, job)
    config["job"] = name
    for dotted, value in spec_edits.items():
        *parents, key = dotted.split(".")
        node = config["spec"]
        for part in parents:
            node = node[int(part) if isinstance(node, list) else part]
        node[key] = value
    (out,) = config["outputs"]
    config["outputs"][out]["path"] = f"artifacts/{name}"
    path = tmp_path / "bundle" / "jobs" / name / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(config))
    return path


def _run_entry(entry: str, config: Path, run_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", f"runtime.jobs.{entry}", "--config", str(config)],
                          env=_env(run_dir), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def _two_tasks(entry: str, config: Path, run_dir: Path, job_id: str) -> list[str]:
    """Run ``entry`` as tasks 1 and 0 of one two-node Slurm job; their stderr, in that order."""
    procs = [subprocess.Popen([sys.executable, "-m", f"runtime.jobs.{entry}", "--config",
                               str(config)],
                              env={**_env(run_dir), "SLURM_PROCID": str(rank),
                                   "SLURM_JOB_ID": job_id},
                              stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    return errs


def test_evaluate_samples_at_eval_temperature_and_max_tokens_seeded_by_train_seed(
        bundle: Path, run_dir: Path, tmp_path: Path) -> None:
    """eval.temperature 1 samples (answers of one prompt differ, greedy's never do),
    eval.max_tokens cuts every answer, and train.seed picks the samples."""
    edits = {"eval.temperature": 1.0, "eval.max_tokens": 2}
    runs = {}
    for name, seed in (("eval_t1", 1234), ("eval_t1_seed7", 7)):
        _run_entry("evaluate", _variant(bundle, tmp_path, "eval_before", name,
                                        {**edits, "train.seed": seed}), run_dir)
        out = run_dir / "artifacts" / name
        runs[name] = (json.loads((out / "metrics.json").read_text()),
                      list(read_jsonl(out / "samples.jsonl")))
    metrics, samples = runs["eval_t1"]
    assert (metrics["temperature"], metrics["max_tokens"], metrics["seed"]) == (1.0, 2, 1234)
    assert all(s["tokens"] <= 2 for s in samples)
    assert any(s["tokens"] == 2 and s["finish_reason"] == "length" for s in samples)
    # An answer is its text, length and end: a barely trained policy also samples tokens
    # that decode to no text (the tokenizer's unused ids), so texts alone may all be "".
    def answer(s: dict[str, Any]) -> tuple[str, int, str]:
        return s["response"], s["tokens"], s["finish_reason"]

    by_prompt: dict[Any, set[tuple[str, int, str]]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], set()).add(answer(s))
    assert any(len(answers) > 1 for answers in by_prompt.values())
    other_metrics, other = runs["eval_t1_seed7"]
    assert other_metrics["seed"] == 7
    assert [s["prompt_id"] for s in other] == [s["prompt_id"] for s in samples]
    assert [answer(s) for s in other] != [answer(s) for s in samples]


def test_sft_runs_its_steps_of_its_batch_size_at_its_lr(bundle: Path, run_dir: Path,
                                                        tmp_path: Path, monkeypatch) -> None:
    from runtime.jobs import sft
    from runtime.jobs.common import JobContext

    path = _variant(bundle, tmp_path, "sft", "policy_sft_3x5",
                    {"sft.steps": 3, "sft.batch_size": 5, "sft.lr": 0.0123})
    ctx = JobContext.load(path, run_dir=run_dir, bundle_dir=path.parents[2], log_to_file=False)
    batches: list[int] = []
    lrs: list[float] = []
    encode = sft.encode_pairs

    def spy_encode(tokenizer, rows, *args):  # type: ignore[no-untyped-def]
        batches.append(len(rows))
        return encode(tokenizer, rows, *args)

    class Recording(torch.optim.AdamW):
        def step(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(sft, "encode_pairs", spy_encode)
    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    sft.run(ctx)
    assert batches == [5, 5, 5]
    assert lrs == [0.0123] * 3
    assert is_complete(run_dir / "artifacts" / "policy_sft_3x5")


# --------------------------------------------------------------------------- screen


def test_screen_drops_exactly_the_prompts_outside_the_range(bundle: Path, run_dir: Path) -> None:
    config = _config(bundle, "screen")
    params = next(f for f in config["spec"]["filters"] if f["type"] == "offline_pass_rate")
    stage = OfflinePassRate(**{k: v for k, v in params.items() if k != "type"})
    _launch(bundle, "screen", run_dir)
    out = run_dir / "artifacts" / "pass_rates"
    assert is_complete(out)
    assert {p.name for p in out.iterdir()} == {"pass_rates.jsonl", "summary.json", COMPLETE_MARKER}
    assert not list(out.parent.glob(".pass_rates.progress-*"))  # done: nothing to resume
    result = ScreenResult.read_jsonl(out / "pass_rates.jsonl")
    rows = list(read_jsonl(run_dir / "artifacts" / "dataset" / "train.jsonl"))
    assert result.prompt_ids == [r["id"] for r in rows]
    k = stage.samples_per_prompt
    assert result.samples_per_prompt == k
    rates = result.pass_rates
    # Rates are means of k 0/1 verifier scores.
    assert np.all((rates >= 0) & (rates <= 1))
    assert np.allclose(rates * k, np.round(rates * k))
    inside = rates < stage.max_pass_rate - 1e-12
    if stage.min_pass_rate is not None:
        inside &= rates > stage.min_pass_rate + 1e-12
    assert np.array_equal(result.kept, inside)
    summary = json.loads((out / "summary.json").read_text())
    too_easy = int((rates >= stage.max_pass_rate - 1e-12).sum())
    hopeless = (0 if stage.min_pass_rate is None
                else int((rates <= stage.min_pass_rate + 1e-12).sum()))
    assert summary["prompts"] == len(rows) == 300
    assert summary["kept"] == int(inside.sum()) == len(result.survivors)
    assert summary["dropped_too_easy"] == too_easy
    assert summary["dropped_hopeless"] == hopeless
    assert summary["kept"] + too_easy + hopeless == len(rows)
    assert summary["screening_rollouts"] == len(rows) * k
    assert summary["screening_cost"] == pytest.approx(
        len(rows) * k * stage.proxy_cost_ratio / stage.reuse_epochs)
    assert result.cost == pytest.approx(summary["screening_cost"])
    # The rates are the verifier's on the proxy's seeded samples: recompute them here.
    from runtime.jobs.sampled import sample_texts
    from runtime.rollout.engine import LocalEngine

    spec = config["spec"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as the job's engine runs
        engine = LocalEngine(run_dir / "artifacts" / "policy_sft", seed=spec["train"]["seed"])
        answers = sample_texts(engine, [r["prompt"] for r in rows], n=k,
                               max_tokens=spec["rollout"]["max_tokens"],
                               temperature=stage.temperature, seed=spec["train"]["seed"])
    finally:
        torch.set_num_threads(threads)
    verifier = ArithmeticVerifier()
    again = [np.mean([verifier.score(r["prompt"], a.text, r["answer"]) for a in group])
             for r, group in zip(rows, answers, strict=True)]
    assert np.allclose(rates, again)


def test_screen_shards_prompts_over_its_nodes(bundle: Path, run_dir: Path,
                                              tmp_path: Path) -> None:
    """filters[0].nodes 2 on Slurm: each of the two tasks screens half of the prompts, task 0
    merges; the pass rates are those of one node (seeded per sample, not per batch)."""
    _launch(bundle, "screen", run_dir)  # the one-node screen (skipped if done above)
    config = _config(bundle, "screen")
    config["job"] = "screen_2nodes"
    config["spec"]["cluster"]["scheduler"] = "slurm"
    stage = next(f for f in config["spec"]["filters"] if f["type"] == "offline_pass_rate")
    stage["nodes"] = 2
    out_name = next(iter(config["outputs"]))
    config["outputs"][out_name]["path"] = "artifacts/pass_rates_2nodes"
    path = tmp_path / "bundle" / "jobs" / "screen_2nodes" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(config))
    errs = _two_tasks("screen", path, run_dir, "4242")
    rows = list(read_jsonl(run_dir / "artifacts" / "dataset" / "train.jsonl"))
    assert "task 1 of 2: 150 of 300 prompts" in errs[0]
    assert "task 0 of 2: 150 of 300 prompts" in errs[1]
    one = ScreenResult.read_jsonl(run_dir / "artifacts" / "pass_rates" / "pass_rates.jsonl")
    two_dir = run_dir / "artifacts" / "pass_rates_2nodes"
    two = ScreenResult.read_jsonl(two_dir / "pass_rates.jsonl")
    assert two.prompt_ids == one.prompt_ids == [r["id"] for r in rows]
    assert np.array_equal(two.pass_rates, one.pass_rates)
    assert np.array_equal(two.kept, one.kept)
    assert json.loads((two_dir / "summary.json").read_text())["nodes"] == 2
    assert not list((run_dir / "artifacts").glob(".pass_rates_2nodes.shards-*"))


def test_sampling_stopped_in_mid_run_resumes_with_what_is_left(
        bundle: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen and eval jobs save each batch's per-prompt values before sampling the next
    (sampled.sample_resumably, runtime.progress): a run stopped after its first batch, run
    again, samples only the prompts left, and its values are those of one uninterrupted run.
    A torn last line (a kill in mid-write) is dropped; another fingerprint starts again."""
    from runtime.jobs.common import JobContext
    from runtime.jobs.sampled import fingerprint, sample_resumably
    from runtime.progress import Progress
    from runtime.rollout.engine import LocalEngine

    monkeypatch.setenv("RLSPEC_RUN_DIR", str(run_dir))
    ctx = JobContext.load(bundle / "jobs" / "screen" / "config.json")
    engine = LocalEngine(run_dir / "artifacts" / "policy_sft", seed=0)
    rows = list(read_jsonl(run_dir / "artifacts" / "dataset" / "train.jsonl"))[:12]
    prompts = {str(r["id"]): r["prompt"] for r in rows}
    calls: list[int] = []
    generate = engine.generate

    def counted(batch: Any, **kw: Any) -> Any:
        calls.append(len(batch))
        return generate(batch, **kw)

    engine.generate = counted  # type: ignore[method-assign]
    sampling = {"n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 3, "per_call": 8}

    def texts(key: str, answers: list[Any]) -> list[str]:
        return [a.text for a in answers]

    whole = sample_resumably(ctx, engine, prompts, Progress(tmp_path / "whole.jsonl", "w"),
                             texts, **sampling)
    assert calls == [4, 4, 4]

    class Killed(Exception):
        pass

    def dies(key: str, answers: list[Any]) -> list[str]:
        if key == str(rows[4]["id"]):  # the first prompt of the second batch
            raise Killed
        return texts(key, answers)

    path = tmp_path / "stopped.jsonl"
    with pytest.raises(Killed):
        sample_resumably(ctx, engine, prompts, Progress(path, "w"), dies, **sampling)
    with path.open("a") as fh:
        fh.write('{"key": "torn", "val')
    calls.clear()
    resumed = Progress(path, "w")
    assert sorted(resumed.done) == sorted(list(prompts)[:4])
    again = sample_resumably(ctx, engine, prompts, resumed, texts, **sampling)
    assert calls == [4, 4]
    assert again == whole
    assert Progress(path, "w").done == whole  # the torn line went, the rest was appended
    assert Progress(path, "other work").done == {}
    # The work is its prompts' text, not only their ids: an edited split is other work.
    by_key = {str(r["id"]): r for r in rows}
    edited = {**by_key, str(rows[0]["id"]): {**rows[0], "prompt": "1+1="}}
    assert fingerprint(ctx, edited, 1) != fingerprint(ctx, by_key, 1) == fingerprint(
        ctx, dict(by_key), 1)


def test_a_failed_sampling_call_is_reported_without_waiting_for_the_next() -> None:
    """sample_batches keeps the next call in flight on served engines; when a call fails,
    the failure comes back at once, not after the call in flight has run to its end."""
    from runtime.jobs.sampled import sample_batches

    release, finished = threading.Event(), threading.Event()

    class Engine:
        model_dir = "m"
        tokenizer = type("T", (), {"eos_token_id": None,
                                   "encode": staticmethod(lambda text, **kw: [1, 2])})()

        def generate(self, prompts: Any, **kw: Any) -> Any:
            if self.calls == 0:
                self.calls += 1
                raise ValueError("engine gone")
            release.wait(60)  # the second call: still running when the first fails
            finished.set()
            return []

        calls = 0

    with pytest.raises(ValueError, match="engine gone"):
        list(sample_batches(Engine(), ["a", "b"], n=1, max_tokens=2, temperature=0.0, seed=0,
                            ahead=1, per_call=1))
    assert not finished.is_set()
    release.set()


def test_evaluate_splits_its_prompts_over_its_nodes(bundle: Path, run_dir: Path,
                                                    tmp_path: Path) -> None:
    """rollout.nodes 2 with the embedded engine on Slurm: each task evaluates half of the
    prompts (not all of them twice), task 0 merges; the result is the one-node result."""
    _launch(bundle, "eval_before", run_dir)
    config = _variant(bundle, tmp_path, "eval_before", "eval_2nodes",
                      {"cluster.scheduler": "slurm", "rollout.nodes": 2})
    errs = _two_tasks("evaluate", config, run_dir, "4243")
    assert "task 1 of 2: 30 of 60 prompts" in errs[0]
    one, two = (run_dir / "artifacts" / name for name in ("eval_before", "eval_2nodes"))
    assert list(read_jsonl(two / "samples.jsonl")) == list(read_jsonl(one / "samples.jsonl"))
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["accuracy"] == json.loads((one / "metrics.json").read_text())["accuracy"]
    assert not list((run_dir / "artifacts").glob(".eval_2nodes.*"))


def test_screen_samples_at_its_temperature_with_its_proxy_model(bundle: Path, run_dir: Path,
                                                                 tmp_path: Path) -> None:
    """temperature 0: the k answers of a prompt are one greedy answer, so every pass rate is
    0 or 1 (at the stage's default 1.0 some are fractional). proxy_model: the compiled screen
    job reads that checkpoint, not the policy."""
    from compiler.api import compile_spec

    _launch(bundle, "screen", run_dir)  # the policy at temperature 1.0
    sampled = ScreenResult.read_jsonl(run_dir / "artifacts" / "pass_rates" / "pass_rates.jsonl")
    assert np.any((sampled.pass_rates > 0) & (sampled.pass_rates < 1))
    _run_entry("screen", _variant(bundle, tmp_path, "screen", "pass_rates_greedy",
                                  {"filters.0.temperature": 0.0}), run_dir)
    greedy = ScreenResult.read_jsonl(run_dir / "artifacts" / "pass_rates_greedy" / PASS_RATES)
    assert set(np.unique(greedy.pass_rates)) <= {0.0, 1.0}

    proxy = run_dir / "artifacts" / "policy_init"
    overrides = [*OVERRIDES, f"filters[0].proxy_model={proxy}"]
    config = json.loads(compile_spec(ROOT / "examples" / "tiny" / "spec.yaml", overrides)
                        .files["jobs/screen/config.json"])
    assert [(a["path"], a["kind"], a["external"]) for a in config["inputs"].values()
            if a["kind"] == "hf_checkpoint"] == [(str(proxy), "hf_checkpoint", True)]
    config["job"] = "screen_proxy"
    (out,) = config["outputs"]
    config["outputs"][out]["path"] = "artifacts/pass_rates_proxy"
    path = tmp_path / "proxy_bundle" / "jobs" / "screen_proxy" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(config))
    _run_entry("screen", path, run_dir)
    summary = json.loads((run_dir / "artifacts" / "pass_rates_proxy" / "summary.json").read_text())
    assert summary["proxy"] == str(proxy) and summary["params"]["proxy_model"] == str(proxy)
    by_proxy = ScreenResult.read_jsonl(run_dir / "artifacts" / "pass_rates_proxy" / PASS_RATES)
    assert by_proxy.prompt_ids == sampled.prompt_ids
    assert not np.array_equal(by_proxy.pass_rates, sampled.pass_rates)  # other weights


# --------------------------------------------------------------------------- export


def test_export_converts_dtype_and_keeps_files(bundle: Path, run_dir: Path) -> None:
    from safetensors.torch import load_file

    config = _config(bundle, "export")
    assert config["spec"]["export"]["dtype"] == "bf16"
    _launch(bundle, "export", run_dir)
    src, out = run_dir / "artifacts" / "policy_final", run_dir / "export"
    assert is_complete(out)
    assert {p.name for p in out.iterdir()} == {p.name for p in src.iterdir()}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    before = load_file(str(src / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(after) == set(before)
    for name, t in after.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, before[name].to(torch.bfloat16))
    # A rerun finds the output complete and skips.
    stamp = (out / COMPLETE_MARKER).read_text()
    _launch(bundle, "export", run_dir)
    assert (out / COMPLETE_MARKER).read_text() == stamp



def test_export_in_fp32_keeps_the_weights_exactly(bundle: Path, run_dir: Path,
                                                  tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _run_entry("export", _variant(bundle, tmp_path, "export", "export_fp32",
                                  {"export.dtype": "fp32"}), run_dir)
    src, out = run_dir / "artifacts" / "policy_final", run_dir / "artifacts" / "export_fp32"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    before = load_file(str(src / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(after) == set(before)
    for name, t in after.items():
        assert t.dtype == torch.float32 and torch.equal(t, before[name])

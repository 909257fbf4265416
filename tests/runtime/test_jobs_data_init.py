"""Job entry points `data` and `init` run from a compiled tiny bundle, plus the shared job helpers.

The jobs run as the scheduler runs them: `bash <bundle>/jobs/<job>/launch.sh` with
RLSPEC_RUN_DIR set, in subprocesses. Re-runs skip complete outputs; a killed writer leaves
only a temporary sibling, which is never taken for an output and is removed by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.jobs.common import (
    COMPLETE_MARKER,
    JobContext,
    JobError,
    atomic_dir,
    atomic_write_json,
    is_complete,
    link_tree,
    run_job,
)

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _env(run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RLSPEC_")) and k not in ("RANK",)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RLSPEC_RUN_DIR"] = str(run_dir)
    env["PYTHONPATH"] = str(ROOT)  # the runtime package of this checkout
    return env


def _launch(bundle: Path, job: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(bundle / "jobs" / job / "launch.sh")], env=_env(run_dir),
                          capture_output=True, text=True, timeout=120, check=False)


def _digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    rlspec = VENV_BIN / "rlspec"
    cmd = ([str(rlspec)] if rlspec.exists() else [sys.executable, "-m", "compiler.cli"])
    subprocess.run([*cmd, "compile", str(ROOT / "examples" / "tiny" / "spec.yaml"), "-o", str(out)],
                   check=True, capture_output=True, text=True, timeout=60)
    return out


def _generator(bundle: Path) -> dict:
    """The data job's generator settings as compiled (the example's, not hard-coded here)."""
    return json.loads((bundle / "jobs" / "data" / "config.json").read_text())["spec"]["data"][
        "generator"]


# --------------------------------------------------------------------------- the two jobs


def test_data_and_init_jobs_then_rerun_skips(bundle: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    data = _launch(bundle, "data", run)
    assert data.returncode == 0, data.stderr
    dataset = run / "artifacts" / "dataset"
    assert is_complete(dataset)
    assert {p.name for p in dataset.iterdir()} == {"train.jsonl", "eval.jsonl", "meta.json",
                                                  COMPLETE_MARKER}
    meta = json.loads((dataset / "meta.json").read_text())
    gen = _generator(bundle)
    assert meta["train"]["count"] == gen["train_size"] and meta["eval"]["count"] == gen["eval_size"]
    assert meta["generator"]["seed"] == 0 and meta["prompt_key"] == "prompt"
    first = json.loads((dataset / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "prompt", "answer", "difficulty"}

    init = _launch(bundle, "init", run)
    assert init.returncode == 0, init.stderr
    assert "510720 parameters" in init.stderr  # tests/runtime/test_policy.py counts them
    assert "Writing model shards" not in init.stderr  # progress bars are off in jobs
    policy = run / "artifacts" / "policy_init"
    assert is_complete(policy)
    assert (run / "logs" / "init.log").read_text().count("saved the initial policy") == 1

    # The checkpoint is the seeded build of the spec's architecture (train.seed = 1234).
    import yaml

    from runtime.policy import build_policy, build_tokenizer, load_policy

    arch = yaml.safe_load((ROOT / "examples" / "tiny" / "spec.yaml").read_text())["model"]["architecture"]
    model, tok = load_policy(policy)
    expected = build_policy(arch, build_tokenizer(64), seed=1234)
    assert tok.encode("37+58=") == [7, 11, 14, 9, 12, 17]
    assert all(torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), expected.state_dict().values(), strict=True))

    before = {"dataset": _digest(dataset), "policy": _digest(policy)}
    for job in ("data", "init"):
        again = _launch(bundle, job, run)
        assert again.returncode == 0, again.stderr
        assert "outputs exist, skipping" in again.stderr
    assert {"dataset": _digest(dataset), "policy": _digest(policy)} == before


def test_killed_writer_leaves_nothing_complete(bundle: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    dataset = run / "artifacts" / "dataset"
    # A writer killed (SIGKILL: no cleanup) in the middle of writing the output.
    script = textwrap.dedent("""
        import os, signal, sys
        from runtime.jobs.common import atomic_dir
        with atomic_dir(sys.argv[1]) as d:
            (d / "train.jsonl").write_text('{"id": 0, "prompt": "1+')
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script, str(dataset)], env=_env(run),
                            capture_output=True, text=True, timeout=60, check=False)
    assert killed.returncode == -9
    partials = list(dataset.parent.glob(".dataset.partial-*"))
    assert len(partials) == 1 and not (partials[0] / COMPLETE_MARKER).exists()
    assert not dataset.exists() and not is_complete(dataset)

    # An output folder without its marker (a writer that did not go through atomic_dir).
    dataset.mkdir(parents=True)
    (dataset / "train.jsonl").write_text("garbage\n")

    result = _launch(bundle, "data", run)
    assert result.returncode == 0, result.stderr
    assert "skipping" not in result.stderr
    assert "removed the partial output" in result.stderr
    assert not list(dataset.parent.glob(".dataset.*"))
    assert is_complete(dataset)
    assert len((dataset / "train.jsonl").read_text().splitlines()) == _generator(bundle)["train_size"]


def test_failure_is_one_line_with_log(bundle: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = json.loads((bundle / "jobs" / "data" / "config.json").read_text())
    config["spec"]["data"]["generator"].update(min_digits=1, max_digits=1, operations=["+"])
    bad = tmp_path / "jobs" / "data" / "config.json"
    atomic_write_json(bad, config)
    result = subprocess.run([sys.executable, "-m", "runtime.jobs.data", "--config", str(bad)],
                            env=_env(run), cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("rlspec job")]
    log = run / "logs" / "data.log"
    total = config["spec"]["data"]["generator"]["train_size"] + config["spec"]["data"][
        "generator"]["eval_size"]
    assert lines == [f"rlspec job data failed: spec.data.generator: train_size + eval_size = {total} "
                     f"exceeds the 100 distinct prompts of 1–1-digit operands with operations "
                     f"['+'] (log: {log})"]
    assert "Traceback" in log.read_text() and "Traceback" not in result.stderr
    assert not (run / "artifacts" / "dataset").exists()
    assert not list((run / "artifacts").glob(".dataset.*"))


def test_sigterm_removes_the_partial_output(tmp_path: Path) -> None:
    config = _write_config(tmp_path, outputs={"out": {"path": "artifacts/out", "kind": "x",
                                                      "external": False}})
    script = textwrap.dedent("""
        import os, signal, sys
        from runtime.jobs.common import run_job

        def fn(ctx):
            with ctx.atomic_output("out") as d:
                (d / "half").write_text("x")
                os.kill(os.getpid(), signal.SIGTERM)

        sys.exit(run_job(fn, ["--config", sys.argv[1]]))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(config)], env=_env(tmp_path / "run"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 143, result.stderr
    assert "rlspec job t terminated" in result.stderr
    assert not (tmp_path / "run" / "artifacts" / "out").exists()
    assert not list((tmp_path / "run" / "artifacts").glob(".out.*"))


# --------------------------------------------------------------------------- helpers


def _tiny_spec() -> dict[str, Any]:
    """The tiny example's resolved spec (every key present), as a compiled config holds it."""
    from spec.loader import load_spec

    return load_spec(ROOT / "examples" / "tiny" / "spec.yaml").spec.model_dump(mode="json")


def _write_config(root: Path, *, inputs: dict[str, Any] | None = None,
                  outputs: dict[str, Any] | None = None, job: str = "t",
                  spec: Any = None) -> Path:
    if spec is None:
        spec = _tiny_spec()
        spec["data"]["shuffle_seed"] = 3
    path = root / "bundle" / "jobs" / job / "config.json"
    atomic_write_json(path, {"job": job, "entry": job, "inputs": inputs or {},
                             "outputs": outputs or {}, "spec": spec,
                             "derived": {"data_parallel": 1}})
    return path


def test_context_resolves_paths(tmp_path: Path) -> None:
    inputs = {
        "made": {"path": "artifacts/made", "kind": "dataset", "external": False},
        "rel": {"path": "data/train.jsonl", "kind": "dataset", "external": True},
        "abs": {"path": str(tmp_path / "abs.jsonl"), "kind": "dataset", "external": True},
    }
    outputs = {"out": {"path": "artifacts/out", "kind": "metrics", "external": False}}
    config = _write_config(tmp_path, inputs=inputs, outputs=outputs)
    run = tmp_path / "run"
    ctx = JobContext.load(config, run_dir=run, log_to_file=False)
    assert ctx.job == "t" and ctx.spec["data"]["shuffle_seed"] == 3
    assert ctx.model_spec.data.shuffle_seed == 3 and ctx.derived["data_parallel"] == 1
    assert ctx.bundle_dir == tmp_path / "bundle"  # <bundle>/jobs/<job>/config.json
    assert ctx.output_path("out") == run / "artifacts" / "out"
    assert ctx.input_path("made", check=False) == run / "artifacts" / "made"
    assert ctx.input_path("rel", check=False) == tmp_path / "data" / "train.jsonl"
    assert ctx.input_path("abs", check=False) == tmp_path / "abs.jsonl"
    assert ctx.section("data.shuffle_seed") == 3

    with pytest.raises(JobError, match="missing or incomplete"):
        ctx.input_path("made")
    with pytest.raises(JobError, match="not found"):
        ctx.input_path("rel")
    with pytest.raises(JobError, match="has no output 'nope'"):
        ctx.output_path("nope")
    with pytest.raises(JobError, match=r"no spec\.model\.nope"):
        ctx.section("model.nope")
    (tmp_path / "abs.jsonl").write_text("{}\n")
    assert ctx.input_path("abs") == tmp_path / "abs.jsonl"
    with atomic_dir(run / "artifacts" / "made"):
        pass
    assert ctx.input_path("made") == run / "artifacts" / "made"
    assert not ctx.outputs_complete()


def test_a_key_the_config_leaves_out_gets_the_models_default(tmp_path: Path) -> None:
    spec = _tiny_spec()
    del spec["system"]["reward_overlap"], spec["system"]["weight_sync"]
    del spec["train"]["checkpoint"]["keep"], spec["train"]["seed"], spec["eval"]
    ctx = JobContext.load(_write_config(tmp_path, spec=spec), run_dir=tmp_path / "run",
                          log_to_file=False)
    # spec.models holds the defaults; the runtime reads them from there, never its own.
    assert ctx.spec["system"]["reward_overlap"] is True
    assert ctx.spec["system"]["weight_sync"] == "disk"
    assert ctx.spec["train"]["checkpoint"]["keep"] == 3 == ctx.model_spec.train.checkpoint.keep
    assert ctx.spec["train"]["seed"] == 1234
    assert ctx.spec["eval"] == {"enabled": True, "every_steps": 0, "samples": 1,
                                "temperature": 0.0, "max_tokens": None}


def test_an_invalid_spec_is_refused_at_load_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _tiny_spec()
    spec["train"]["checkpoint"]["keep"] = 0
    spec["rollout"]["bogus"] = 1
    config = _write_config(tmp_path, spec=spec)
    with pytest.raises(JobError) as err:
        JobContext.load(config, run_dir=tmp_path / "run", log_to_file=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config {config} has an invalid spec (")
    assert "spec.train.checkpoint.keep: must be greater than 0, got 0" in message
    assert "spec.rollout.bogus: unknown key 'bogus'" in message

    # A job refuses it before it starts, in the one stderr line of a failed job.
    assert run_job(lambda ctx: None, ["--config", str(config)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"rlspec job t failed: {message} (log: none)"]

    atomic_write_json(config, {"job": "t"})
    with pytest.raises(JobError, match="has no spec"):
        JobContext.load(config, run_dir=tmp_path / "run", log_to_file=False)


def test_atomic_dir_keeps_old_output_on_failure_and_replaces_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final, job="t") as d:
        (d / "a.txt").write_text("one")
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text("deep")
    assert is_complete(final) and (final / "sub" / "b.txt").read_text() == "deep"
    assert json.loads((final / COMPLETE_MARKER).read_text())["job"] == "t"

    with pytest.raises(RuntimeError, match="boom"), atomic_dir(final) as d:
        (d / "a.txt").write_text("two")
        raise RuntimeError("boom")
    assert (final / "a.txt").read_text() == "one"  # the complete output is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    with atomic_dir(final) as d:
        (d / "c.txt").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE_MARKER, "c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_link_tree_links_a_folder_and_copies_where_links_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The RL job's policy_final is the last weights folder: hard links, no second copy of
    the weights (about 490 GB at 245 B); a filesystem that refuses links gets copies."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.safetensors").write_bytes(b"weights")
    (src / "sub" / "t.json").write_text("{}")
    linked = tmp_path / "linked"
    linked.mkdir()
    link_tree(src, linked)
    for rel in ("w.safetensors", "sub/t.json"):
        assert (linked / rel).stat().st_ino == (src / rel).stat().st_ino, rel

    def refuse(a: str, b: str) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("os.link", refuse)
    copied = tmp_path / "copied"
    copied.mkdir()
    link_tree(src, copied)
    for rel in ("w.safetensors", "sub/t.json"):
        assert (copied / rel).read_bytes() == (src / rel).read_bytes()
        assert (copied / rel).stat().st_ino != (src / rel).stat().st_ino, rel


def test_run_job_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("RLSPEC_RUN_DIR", str(tmp_path / "run"))
    config = _write_config(tmp_path, outputs={"out": {"path": "artifacts/out", "kind": "x",
                                                      "external": False}})
    argv = ["--config", str(config)]

    def interrupted(ctx: JobContext) -> None:
        raise KeyboardInterrupt

    assert run_job(interrupted, argv) == 130
    assert "rlspec job t interrupted" in capsys.readouterr().err

    closed: list[str] = []

    class Resource:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            closed.append(self.name)
            if self.name == "b":
                raise OSError("closing b failed")  # the job's outcome stands

    def forgets(ctx: JobContext) -> None:
        ctx.closing(Resource("a"))
        assert ctx.closing(Resource("b")).name == "b"
        ctx.output_path("out").mkdir(parents=True)

    assert run_job(forgets, argv) == 1
    assert closed == ["b", "a"]  # what a job opened is closed when it fails, last first
    assert "failed: finished without completing output(s) out" in capsys.readouterr().err

    calls: list[str] = []

    def writes(ctx: JobContext) -> None:
        calls.append(ctx.job)
        with ctx.atomic_output("out") as d:
            (d / "x").write_text("1")

    assert run_job(writes, argv) == 0
    assert run_job(writes, argv) == 0  # skipped
    assert "outputs exist, skipping" in capsys.readouterr().err
    assert run_job(writes, [*argv, "--force"]) == 0
    assert calls == ["t", "t"]

    assert run_job(writes, ["--config", str(tmp_path / "missing.json")]) == 1
    assert "failed: config not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- init's architecture


def _init_checkpoint(root: Path, **arch: Any) -> Path:
    """Run the init job in this process on the tiny spec with ``arch`` edits; its checkpoint."""
    from runtime.jobs import init

    spec = _tiny_spec()
    spec["model"]["architecture"].update(arch)
    config = _write_config(root, job="init", spec=spec, outputs={
        "policy_init": {"path": "artifacts/policy_init", "kind": "hf_checkpoint",
                        "external": False}})
    ctx = JobContext.load(config, run_dir=root / "run", log_to_file=False)
    init.run(ctx)
    return ctx.output_path("policy_init")


def test_init_builds_head_dim_positions_rope_and_tied_embeddings_of_the_spec(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit head_dim (24, not hidden / heads = 16), max_position_embeddings,
    rope_theta and tie_embeddings reach the init job's checkpoint: its config.json, the
    model the jobs load from it (attention widths, one shared embedding tensor, other
    log-probs under another RoPE base), its tokenizer, and the embedded engine's context."""
    from safetensors.torch import load_file

    from runtime.policy import load_policy
    from runtime.rollout.engine import EngineError, LocalEngine

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    default = _init_checkpoint(tmp_path / "default")
    edited = _init_checkpoint(tmp_path / "edited", head_dim=24, max_position_embeddings=40,
                              rope_theta=5000.0, tie_embeddings=True)
    cfg = json.loads((edited / "config.json").read_text())
    assert cfg["head_dim"] == 24 and cfg["max_position_embeddings"] == 40
    assert cfg["rope_theta"] == 5000.0 and cfg["rope_parameters"]["rope_theta"] == 5000.0
    assert cfg["tie_word_embeddings"] is True
    base = json.loads((default / "config.json").read_text())
    assert (base["head_dim"], base["max_position_embeddings"], base["rope_theta"],
            base["tie_word_embeddings"]) == (32, 256, 1_000_000.0, False)

    model, tok = load_policy(edited)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == \
        (4 * 24, 2 * 24, 4 * 24)  # heads × head_dim, query groups × head_dim
    assert model.lm_head.weight is model.model.embed_tokens.weight  # one tensor
    assert "lm_head.weight" not in load_file(edited / "model.safetensors")
    assert "lm_head.weight" in load_file(default / "model.safetensors")
    assert tok.model_max_length == 40

    # RoPE has no weights: the same seed gives the same tensors, and only the base differs.
    rope_only = _init_checkpoint(tmp_path / "rope", rope_theta=5000.0)
    a, _ = load_policy(default)
    b, _ = load_policy(rope_only)
    assert all(torch.equal(x, y) for x, y in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    ids = torch.tensor([tok.encode("12+34=46 9*9=81")])
    with torch.no_grad():
        gap = (a(ids).logits.log_softmax(-1) - b(ids).logits.log_softmax(-1)).abs().max()
    assert gap > 1e-3

    # The embedded engine's context is the checkpoint's max_position_embeddings.
    engine = LocalEngine(edited, seed=0)
    assert engine.max_model_len == 40
    out = engine.generate([tok.encode("1+1=") * 9], max_tokens=20, seed=0, ignore_eos=True)
    assert len(out[0].samples[0].token_ids) == 40 - 36
    with pytest.raises(EngineError, match="40"):
        engine.generate([tok.encode("1+1=") * 10], max_tokens=1, seed=0)

"""Bundles: golden files, shell validity, graph shape, atomic writes, quoting, node split."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from compiler import bundle as bundle_mod
from compiler.api import compile_spec
from compiler.bundle import BundleError, write_bundle
from compiler.graph import GraphError, Job, _link, build_graph
from compiler.plan import make_plan
from spec.errors import SpecError
from tests.helpers import SLURM_STUBS, write_stubs

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = {
    "tiny": ROOT / "examples" / "tiny" / "spec.yaml",
    "single-node": ROOT / "examples" / "single-node.yaml",
    "compassmax-245b": ROOT / "examples" / "compassmax-245b.yaml",
}
RECIPES = sorted((ROOT / "tests" / "compiler" / "recipes").glob("*.yaml"))
UPDATE = os.environ.get("RLSPEC_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_golden_bundle(name: str) -> None:
    """A changed rendering shows as a diff; RLSPEC_UPDATE_GOLDEN=1 (make golden) records it."""
    files = compile_spec(EXAMPLES[name]).files
    golden = GOLDEN / name
    if UPDATE:
        shutil.rmtree(golden, ignore_errors=True)
        write_bundle(files, golden)
    recorded = {str(p.relative_to(golden)): p.read_text() for p in golden.rglob("*") if p.is_file()}
    assert sorted(recorded) == sorted(files), "files added or removed; run `make golden`"
    diffs = []
    for rel, text in sorted(files.items()):
        if recorded[rel] != text:
            diffs.extend(difflib.unified_diff(recorded[rel].splitlines(), text.splitlines(),
                                              f"golden/{name}/{rel}", f"rendered/{rel}", lineterm=""))
    assert not diffs, "rendering changed (run `make golden` if intended):\n" + "\n".join(diffs)


@pytest.mark.parametrize("path", [*EXAMPLES.values(), *RECIPES], ids=lambda p: p.stem)
def test_rendered_scripts_pass_bash_n_and_shellcheck(path: Path, tmp_path: Path) -> None:
    # The renderer's output, also for recipes whose layout the runtime refuses today.
    out = write_bundle(compile_spec(path, preflight=False).files, tmp_path / "b")
    scripts = sorted(str(p.relative_to(out)) for p in out.rglob("*.sh"))
    assert "jobs/rl/launch.sh" in scripts and "env.sh" in scripts
    for script in scripts:
        subprocess.run(["bash", "-n", script], cwd=out, check=True)
    assert shutil.which("shellcheck"), "shellcheck is installed by `make test` (Debian package)"
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=out, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_same_spec_gives_byte_identical_bundles(tmp_path: Path) -> None:
    a = write_bundle(compile_spec(EXAMPLES["compassmax-245b"]).files, tmp_path / "a")
    b = write_bundle(compile_spec(EXAMPLES["compassmax-245b"]).files, tmp_path / "b")
    files_a = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    assert files_a == files_b


def test_manifest_hashes_every_file_and_lists_jobs() -> None:
    compiled = compile_spec(EXAMPLES["tiny"])
    manifest = json.loads(compiled.files["manifest.json"])
    assert set(manifest["files"]) == set(compiled.files) - {"manifest.json"}
    assert manifest["order"] == compiled.graph.order()
    assert manifest["jobs"]["rl"]["depends_on"] == ["data", "screen", "sft"]
    assert manifest["jobs"]["rl"]["roles"] == {"rollout": 1, "train": 1}
    assert len(manifest["spec_sha256"]) == 64


# --------------------------------------------------------------------------- graph


def _graph_for(tmp_path: Path, edits: list[str]):
    return compile_spec(EXAMPLES["tiny"], edits).graph


def test_jobs_follow_from_the_spec(tmp_path: Path) -> None:
    full = _graph_for(tmp_path, [])
    assert full.order() == ["data", "init", "sft", "eval_before", "screen", "rl", "eval_after",
                            "export"]
    bare = _graph_for(tmp_path, [
        "filters=[]", "algorithm.advantage.estimator=group", "sft=null", "eval.enabled=false",
        "export=null",
    ])
    assert bare.order() == ["data", "init", "rl"]
    assert bare.dependencies("rl") == ["data", "init"]


def test_megatron_checkpoint_gets_an_hf_copy_for_the_engines() -> None:
    compiled = compile_spec(EXAMPLES["single-node"], [
        "model.checkpoint=/ckpt/mcore", "model.checkpoint_format=megatron",
        "model.tokenizer=/ckpt/tokenizer"])
    g = compiled.graph
    assert "to_hf" in g.jobs and "convert" not in g.jobs
    assert g.artifacts["user_checkpoint"].external
    assert "user_checkpoint" in g.jobs["rl"].inputs  # Megatron starts from the user's weights
    assert g.dependencies("rl") == ["to_hf"]


def test_hf_checkpoint_is_converted_for_megatron() -> None:
    g = compile_spec(EXAMPLES["compassmax-245b"]).graph
    assert g.jobs["convert"].inputs == ("policy_init",)
    assert "policy_megatron" in g.jobs["rl"].inputs
    assert g.edge_artifacts("convert", "rl") == ["policy_megatron"]


def test_the_eval_jobs_read_data_eval() -> None:
    g = compile_spec(EXAMPLES["single-node"], ["eval.every_steps=10"]).graph
    held_out = g.artifacts["eval_dataset"]
    assert (held_out.path, held_out.kind, held_out.external) == (
        "/data/math/aime-2024.jsonl", "dataset", True)
    assert g.jobs["eval_before"].inputs[0] == g.jobs["eval_after"].inputs[0] == "eval_dataset"
    assert "eval_dataset" in g.jobs["rl"].inputs  # the in-run evaluation
    quiet = compile_spec(EXAMPLES["single-node"], ["eval.every_steps=0"]).graph
    assert "eval_dataset" not in quiet.jobs["rl"].inputs
    # Generated data: the eval split is in the data job's folder.
    tiny = compile_spec(EXAMPLES["tiny"]).graph
    assert "eval_dataset" not in tiny.artifacts
    assert tiny.jobs["eval_before"].inputs[0] == "dataset"


def test_dangling_artifacts_and_cycles_are_rejected() -> None:
    from compiler.graph import Artifact

    a = Artifact("a", "dataset", "artifacts/a")
    b = Artifact("b", "dataset", "artifacts/b")
    dangling = {"x": Job("x", "x", "", 1, 0, ("a",), ("b",))}
    with pytest.raises(GraphError, match="no job produces"):
        _link(dangling, {"a": a, "b": b})
    cycle = {"x": Job("x", "x", "", 1, 0, ("a",), ("b",)),
             "y": Job("y", "y", "", 1, 0, ("b",), ("a",))}
    with pytest.raises(GraphError, match="cycle"):
        _link(cycle, {"a": a, "b": b})
    with pytest.raises(GraphError, match="nothing provides"):
        _link({"x": Job("x", "x", "", 1, 0, ("zzz",), ())}, {})


def test_graph_is_pure() -> None:
    spec = compile_spec(EXAMPLES["tiny"]).validated.source.spec
    plan = make_plan(spec)
    assert build_graph(spec, plan).to_json() == build_graph(spec, plan).to_json()


# --------------------------------------------------------------------------- writing


def test_write_is_atomic_and_refuses_to_clobber(tmp_path: Path, monkeypatch) -> None:
    files = compile_spec(EXAMPLES["tiny"]).files
    out = write_bundle(files, tmp_path / "b")
    before = (out / "manifest.json").read_text()
    with pytest.raises(BundleError, match="--force"):
        write_bundle(files, out)
    (tmp_path / "notabundle").mkdir()
    with pytest.raises(BundleError, match="not an rlspec bundle"):
        write_bundle(files, tmp_path / "notabundle", force=True)

    # A failure part-way leaves the old bundle as it was and no temporary directory behind.
    real = Path.write_text
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(files, out, force=True)
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "notabundle"]


def test_a_submitted_bundle_is_not_overwritten(tmp_path: Path) -> None:
    files = compile_spec(EXAMPLES["tiny"]).files
    out = write_bundle(files, tmp_path / "b")
    (out / bundle_mod.SUBMISSION).write_text("{}")
    with pytest.raises(BundleError, match="submitted"):
        write_bundle(files, out, force=True)


# --------------------------------------------------------------------------- shell safety


def test_values_reaching_the_shell_are_quoted(tmp_path: Path) -> None:
    nasty = "a b'c\"$(touch pwned)`touch pwned2`;$HOME"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(EXAMPLES["tiny"].read_text())
    compiled = compile_spec(spec_file, [
        f"cluster.env.WEIRD={json.dumps(nasty)}", "cluster.modules=['cuda/12.4 && echo hi']",
        "cluster.output_dir='/tmp/dir with space'",
    ])
    out = write_bundle(compiled.files, tmp_path / "b")
    script = 'module() { printf "%s|" "$@"; echo; }; source env.sh; printf "%s\\n" "$WEIRD" "$RLSPEC_RUN_DIR"'
    result = subprocess.run(["bash", "-c", script], cwd=out, capture_output=True, text=True,
                            check=True, env={"PATH": os.environ["PATH"]})
    assert result.stdout.splitlines() == [
        "load|cuda/12.4 && echo hi|", nasty, "/tmp/dir with space/tiny"]
    assert not list(out.rglob("pwned*")) and not list(tmp_path.rglob("pwned*"))


def test_secrets_stay_out_of_the_bundle(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(SpecError, match="env_passthrough"):
        compile_spec(EXAMPLES["tiny"], ["cluster.env.HF_TOKEN=abc"])
    monkeypatch.setenv("MY_SECRET_TOKEN", "s3cr3t-value")
    compiled = compile_spec(EXAMPLES["tiny"], ["cluster.env_passthrough=[MY_SECRET_TOKEN]"])
    assert not any("s3cr3t-value" in text for text in compiled.files.values())
    out = write_bundle(compiled.files, tmp_path / "b")
    env_sh = "source env.sh && echo \"$MY_SECRET_TOKEN\""
    ok = subprocess.run(["bash", "-c", env_sh], cwd=out, capture_output=True, text=True,
                        env={"PATH": os.environ["PATH"], "MY_SECRET_TOKEN": "v"})
    assert ok.returncode == 0 and ok.stdout.strip() == "v"
    missing = subprocess.run(["bash", "-c", env_sh], cwd=out, capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"]})
    assert missing.returncode != 0
    assert "MY_SECRET_TOKEN must be set" in missing.stderr


# --------------------------------------------------------------------------- node split

STUBS = {
    **SLURM_STUBS,
    "torchrun": 'echo "torchrun $*" >> "$RECORD/torchrun.$SLURMD_NODENAME"; sleep 2',
    "vllm": 'echo "vllm $*" >> "$RECORD/vllm.$SLURMD_NODENAME"; sleep 2',
    # The driver: records its environment, then finishes the run.
    "python": 'echo "$RLSPEC_ROLLOUT_ENDPOINTS" > "$RECORD/endpoints"; sleep 1',
}


def test_245b_rl_job_splits_nodes_and_launches_every_role(tmp_path: Path) -> None:
    out = write_bundle(compile_spec(EXAMPLES["compassmax-245b"]).files, tmp_path / "b")
    bin_dir, record = write_stubs(tmp_path / "bin", STUBS), tmp_path / "record"
    record.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "RLSPEC_TEST_NODES": "24", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node-[0-23]",
           "RLSPEC_RUN_DIR": str(tmp_path / "run"), "RLSPEC_PYTHON": "python", "HF_TOKEN": "x", "JUDGE_API_KEY": "y",
           "WANDB_API_KEY": "z"}
    result = subprocess.run(["bash", "jobs/rl/launch.sh"], cwd=out, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    # Trainer: nodes 8..23, node ranks 0..15, master = the first trainer node.
    for rank in range(16):
        args = (record / f"torchrun.node-{8 + rank}").read_text().split()
        assert args[args.index("--nnodes") + 1] == "16"
        assert args[args.index("--node-rank") + 1] == str(rank)
        assert args[args.index("--nproc-per-node") + 1] == "8"
        assert args[args.index("--master-addr") + 1] == "node-8"
        assert args[args.index("--expert-model-parallel-size") + 1] == "8"
        assert args[args.index("--expert-tensor-parallel-size") + 1] == "1"
        assert "--sequence-parallel" in args and "--moe-enable-routing-replay" in args
    assert not list(record.glob("torchrun.node-[0-7]"))

    # Rollout: nodes 0..7, 4 replicas of 2 nodes; heads serve, the others are headless.
    for node in range(8):
        args = (record / f"vllm.node-{node}").read_text().split()
        assert args[args.index("--host") + 1] == f"node-{node}"
        assert args[args.index("--data-parallel-address") + 1] == f"node-{node - node % 2}"
        assert "--enable-return-routed-experts" in args and "--enable-expert-parallel" in args
        if node % 2:
            assert "--headless" in args
            assert args[args.index("--data-parallel-start-rank") + 1] == "1"
        else:
            assert "--headless" not in args
    assert (record / "endpoints").read_text().split() == [
        "http://node-0:8000,http://node-2:8000,http://node-4:8000,http://node-6:8000"]


def test_the_rl_driver_runs_in_the_container_on_slurm(tmp_path: Path) -> None:
    # Every role of a Slurm run starts in cluster.container, the driver on the batch host too.
    out = write_bundle(compile_spec(EXAMPLES["compassmax-245b"]).files, tmp_path / "b")
    assert 'rlspec_run_here "$RLSPEC_PYTHON" -m runtime.jobs.rl' in (
        out / "jobs" / "rl" / "launch.sh").read_text()
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "srun $*"\n')
    stub.chmod(0o755)
    script = f'source "{out}/lib.sh"; rlspec_run_here python3 -m runtime.jobs.rl'
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURMD_NODENAME": "n1"}
    ran = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert ran.startswith("srun --overlap --nodes=1 --ntasks=1 --nodelist=n1 ")
    assert "--container-image=/lustre/images/rlspec-megatron-vllm.sqsh" in ran
    assert ran.rstrip().endswith("python3 -m runtime.jobs.rl")
    env.pop("SLURM_JOB_ID")  # a local run starts it directly
    ran = subprocess.run(["bash", "-c", script.replace("python3", "echo")], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert ran.strip() == "-m runtime.jobs.rl"

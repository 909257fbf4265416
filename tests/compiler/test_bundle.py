"""Bundles: golden files, shell validity, graph shape, atomic writes, quoting, node split."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from compiler import bundle as bundle_mod
from compiler.api import compile_spec
from compiler.bundle import BundleError, write_bundle
from compiler.graph import GraphError, Job, _link, build_graph
from compiler.plan import make_plan
from spec.errors import SpecError
from tests.helpers import AWAIT_ROLES, HOLD, SLURM_STUBS, STARTED, write_stubs

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = {
    "tiny": ROOT / "examples" / "tiny" / "spec.yaml",
    "qwen3-30b-a3b": ROOT / "examples" / "qwen3-30b-a3b.yaml",
    "compassmax-245b": ROOT / "examples" / "compassmax-245b.yaml",
}
# The published layouts that validate (test_recipes.NOT_EXPRESSIBLE lists the one that cannot).
RECIPES = sorted(p for p in (ROOT / "tests" / "compiler" / "recipes").glob("*.yaml")
                 if p.stem != "qwen3-235b-a22b-modelzoo")
UPDATE = os.environ.get("RLSPEC_UPDATE_GOLDEN") == "1"
# The bash that runs rendered scripts here; RLSPEC_TEST_BASH=/path/to/bash-4.4 runs them on
# the oldest bash a batch host may have (RHEL/Rocky 8 ship 4.4), sub-scripts included.
BASH = os.environ.get("RLSPEC_TEST_BASH", "bash")


def bash_first_on_path(bin_dir: Path) -> None:
    """Make ``bin_dir``'s `bash` the test's BASH, for the scripts a launch script starts."""
    if BASH != "bash":
        bin_dir.mkdir(parents=True, exist_ok=True)
        (bin_dir / "bash").unlink(missing_ok=True)
        (bin_dir / "bash").symlink_to(Path(BASH).resolve())


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
        subprocess.run([BASH, "-n", script], cwd=out, check=True)
    assert shutil.which("shellcheck"), "shellcheck is installed by `make test` (Debian package)"
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=out, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(("example", "edits"), [
    ("compassmax-245b", ("sft={steps: 10}",)),  # GPUs: torchrun
    ("tiny", ("train.backend=megatron", "model.architecture.moe.token_dispatcher=allgather",
              "cluster.gpus_per_node=2", "train.parallelism.expert=2")),  # CPU: file rendezvous
], ids=["gpu", "cpu"])
def test_megatron_scripts_pass_bash_n_and_shellcheck(example: str, edits: tuple[str, ...],
                                                         tmp_path: Path) -> None:
    files = compile_spec(EXAMPLES[example], edits).files
    out = write_bundle(files, tmp_path / "b")
    scripts = ["jobs/sft/launch.sh", "jobs/sft/train.sh", "jobs/rl/launch.sh", "jobs/rl/train.sh"]
    for script in scripts:
        subprocess.run([BASH, "-n", script], cwd=out, check=True)
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=out, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# Bash features newer than 4.4 (RHEL/Rocky 8's bash; Ubuntu 20.04 has 5.0): the pattern, what
# it is, and a line it must catch (so that no pattern is vacuous).
NEWER_THAN_BASH_4_4 = {
    r"\bwait\b[^#\n]*\s-[a-z]*[pf]": ("wait -p/-f (bash 5.0/5.1)", 'wait -n -p FINISHED "$A"'),
    r"\bwait\s+-n\s+(?!\d*[<>])[^\s|&;)#<>]": ("wait -n with ids (bash 5.1; 4.4 ignores them)", 'wait -n "$A" "$B"'),
    r"\$\{[^}]*@[ULuKk]\}": ("${var@U/u/L/K/k} (bash 5.1+)", 'echo "${name@U}"'),
    r"\b(EPOCHSECONDS|EPOCHREALTIME|SRANDOM|BASH_ARGV0)\b": ("a bash 5 variable", "t=$EPOCHSECONDS"),
    r"\bshopt\b.*\b(localvar_inherit|localvar_unset|assoc_expand_once|patsub_replacement"
    r"|noexpand_translation|varredir_close|globskipdots)\b": ("a bash 5 shopt", "shopt -s localvar_inherit"),
    r"\b(declare|local|typeset)\s+-[a-zA-Z]*A[a-zA-Z]*\s+\w+=\(\s*[^\[\s)]":
        ("associative array from key value pairs (bash 5.1)", "declare -A M=(k v)"),
}


def test_the_bash_4_4_patterns_catch_what_they_name() -> None:
    for pattern, (what, example) in NEWER_THAN_BASH_4_4.items():
        assert re.search(pattern, example), what
    assert not any(re.search(p, 'wait -n 2>/dev/null\nwait "$pid" || return\ndeclare -A R=([$a]=x)')
                   for p in NEWER_THAN_BASH_4_4)


@pytest.mark.parametrize("path", [*EXAMPLES.values(), *RECIPES], ids=lambda p: p.stem)
def test_rendered_scripts_run_on_bash_4_4(path: Path, tmp_path: Path) -> None:
    """No construct of a bash newer than 4.4 in any rendered script (shellcheck has no bash
    version dialect); test_rl_launch_* below run the scripts (on 4.4 with RLSPEC_TEST_BASH)."""
    out = write_bundle(compile_spec(path, preflight=False).files, tmp_path / "b")
    found = []
    for script in sorted(out.rglob("*.sh")):
        for number, line in enumerate(script.read_text().splitlines(), 1):
            code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
            for pattern, (what, _) in NEWER_THAN_BASH_4_4.items():
                if re.search(pattern, code):
                    found.append(f"{script.relative_to(out)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


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
    compiled = compile_spec(EXAMPLES["qwen3-30b-a3b"], [
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
    g = compile_spec(EXAMPLES["qwen3-30b-a3b"], ["eval.every_steps=10"]).graph
    held_out = g.artifacts["eval_dataset"]
    assert (held_out.path, held_out.kind, held_out.external) == (
        "/data/math/aime-2024.jsonl", "dataset", True)
    assert g.jobs["eval_before"].inputs[0] == g.jobs["eval_after"].inputs[0] == "eval_dataset"
    assert "eval_dataset" in g.jobs["rl"].inputs  # the in-run evaluation
    quiet = compile_spec(EXAMPLES["qwen3-30b-a3b"], ["eval.every_steps=0"]).graph
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


def test_force_keeps_what_the_old_bundle_did_not_write(tmp_path: Path, monkeypatch) -> None:
    """The run directory of `cluster.output_dir: runs`, logs and notes in the bundle are moved
    into the new bundle; the old bundle's own files are replaced, its stale job folders go."""
    out = write_bundle(compile_spec(EXAMPLES["tiny"]).files, tmp_path / "b")
    (out / "runs" / "tiny" / "checkpoints").mkdir(parents=True)
    (out / "runs" / "tiny" / "checkpoints" / "m.pt").write_bytes(b"weights")
    (out / "NOTES.md").write_text("mine")
    (out / "jobs" / "rl" / "my.patch").write_text("patch")
    (out / "jobs" / "rl" / "train.sh").write_text("edited")  # the bundle's own: replaced
    assert bundle_mod.foreign_paths(out) == ["NOTES.md", "jobs/rl/my.patch", "runs"]

    new = compile_spec(EXAMPLES["qwen3-30b-a3b"]).files
    real_rename = os.rename

    def failing_swap(src, dst):  # the swap fails after the user's paths were carried over
        if str(dst).endswith(".b.old"):
            raise OSError("busy")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_swap)
    with pytest.raises(OSError, match="busy"):
        write_bundle(new, out, force=True)
    monkeypatch.undo()
    assert (out / "runs" / "tiny" / "checkpoints" / "m.pt").read_bytes() == b"weights"
    assert bundle_mod.foreign_paths(out) == ["NOTES.md", "jobs/rl/my.patch", "runs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]

    write_bundle(new, out, force=True)
    assert (out / "runs" / "tiny" / "checkpoints" / "m.pt").read_bytes() == b"weights"
    assert (out / "NOTES.md").read_text() == "mine"
    assert (out / "jobs" / "rl" / "my.patch").read_text() == "patch"
    assert (out / "jobs" / "rl" / "train.sh").read_text() == new["jobs/rl/train.sh"]
    assert not (out / "jobs" / "data").exists()  # tiny's job, not qwen's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_force_refuses_a_kept_path_the_new_bundle_would_write(tmp_path: Path) -> None:
    out = write_bundle(compile_spec(EXAMPLES["qwen3-30b-a3b"]).files, tmp_path / "b")
    (out / "jobs" / "data").mkdir()  # not qwen's; the tiny bundle has a data job
    (out / "jobs" / "data" / "x").write_text("mine")
    with pytest.raises(BundleError, match="jobs/data, which the old bundle did not write"):
        write_bundle(compile_spec(EXAMPLES["tiny"]).files, out, force=True)
    assert (out / "jobs" / "data" / "x").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


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
    result = subprocess.run([BASH, "-c", script], cwd=out, capture_output=True, text=True,
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
    ok = subprocess.run([BASH, "-c", env_sh], cwd=out, capture_output=True, text=True,
                        env={"PATH": os.environ["PATH"], "MY_SECRET_TOKEN": "v"})
    assert ok.returncode == 0 and ok.stdout.strip() == "v"
    missing = subprocess.run([BASH, "-c", env_sh], cwd=out, capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"]})
    assert missing.returncode != 0
    assert "MY_SECRET_TOKEN must be set" in missing.stderr


def test_a_secret_in_a_comment_is_masked_in_the_bundle_copy_of_the_spec(tmp_path: Path) -> None:
    """A comment is no value, so nothing refuses it; the bundle keeps the user's spec text
    (spec.yaml) with every credential and URL password masked, and compile warns at the line."""
    token = "hf_" + "Ab1" * 12
    text = EXAMPLES["tiny"].read_text().replace(
        "\n", f"\n# old token: {token}\n# mirror: https://bob:hunter22@mirror.example/\n", 1)
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    compiled = compile_spec(spec)
    assert not any(token in t or "hunter22" in t for t in compiled.files.values())
    copy = compiled.files["spec.yaml"]
    assert "# old token: hf_A***" in copy and "https://bob:hu***@mirror.example/" in copy
    assert copy.replace("hf_A***", token).replace("hu***", "hunter22") == text  # nothing else
    warned = {(w.line, w.message.split(":")[0]) for w in compiled.validated.warnings
              if "masks it" in w.message}
    assert warned == {(2, "this line holds what looks like a Hugging Face token"),
                      (3, "this line holds what looks like a URL with a password")}


def test_the_time_limit_watcher_ends_with_its_launch_script(tmp_path: Path) -> None:
    """lib.sh's requeue watcher is disowned: a launch script whose EXIT trap waits for its
    roles (the RL and served jobs' `wait`) ends with its work instead of waiting, with the
    watcher, for the time limit and requeuing a finished job. A local spec's bundle has no
    watcher: a local run inside someone's Slurm allocation must not requeue it."""
    out = write_bundle(compile_spec(EXAMPLES["tiny"], ["cluster.scheduler=slurm",
                                                       "cluster.max_requeues=2"]).files,
                       tmp_path / "b")
    record = tmp_path / "record"
    (tmp_path / "run" / "logs").mkdir(parents=True)
    record.mkdir()
    bin_dir = write_stubs(tmp_path / "bin", {
        "squeue": 'echo 1:43',  # 103 s left: due 3 s after the start, with a 100 s lead
        "scontrol": 'echo "$*" >> "$RECORD/scontrol"'})
    script = (f'set -euo pipefail; source {out / "lib.sh"}; rlspec_requeue_before_time_limit '
              "probe; trap wait EXIT; sleep 0.1 & exit 0")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "RLSPEC_RUN_DIR": str(tmp_path / "run"), "RLSPEC_REQUEUE_LEAD_S": "100",
           "RECORD": str(record)}
    done = subprocess.run([BASH, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # Had the script waited for the watcher, the watcher would have requeued it first.
    assert not (record / "scontrol").exists()
    assert "max_requeues" in (out / "lib.sh").read_text()
    local = compile_spec(EXAMPLES["tiny"]).files
    assert not any("requeue" in local[f] for f in ("lib.sh", "jobs/rl/launch.sh"))


def test_modules_load_on_the_hosts_not_in_the_container(tmp_path: Path) -> None:
    """The image has no module system: env.sh, sourced inside the container's steps too,
    loads cluster.modules only where RLSPEC_IN_CONTAINER is unset (lib.sh sets it there)."""
    compiled = compile_spec(EXAMPLES["compassmax-245b"], ["cluster.modules=[cuda/12.4]"])
    out = write_bundle(compiled.files, tmp_path / "b")
    script = ('module() { echo "module $*"; }; export -f module; '
              'HF_TOKEN=x JUDGE_API_KEY=y WANDB_API_KEY=z; export HF_TOKEN JUDGE_API_KEY '
              'WANDB_API_KEY; source env.sh')
    env = {"PATH": os.environ["PATH"]}
    host = subprocess.run([BASH, "-c", script], cwd=out, capture_output=True, text=True, env=env)
    assert host.returncode == 0 and host.stdout == "module load cuda/12.4\n", host.stderr
    inside = subprocess.run([BASH, "-c", script], cwd=out, capture_output=True, text=True,
                            env={**env, "RLSPEC_IN_CONTAINER": "1"})
    assert inside.returncode == 0 and inside.stdout == "", inside.stderr


# --------------------------------------------------------------------------- node split

STUBS = {
    **SLURM_STUBS,
    "torchrun": f'echo "torchrun $*" >> "$RECORD/torchrun.$SLURMD_NODENAME"; {STARTED}; {HOLD}',
    # vLLM's interpreter (RLSPEC_VLLM_PYTHON): python -m vllm.entrypoints.openai.api_server ...
    "vllm-python": f'[ "$1" = -c ] && exit 0; echo "vllm $*" >> "$RECORD/vllm.$SLURMD_NODENAME"; {STARTED}; {HOLD}',
    # The driver: records its environment, then finishes the run once every role has started.
    "python": f'echo "$RLSPEC_ROLLOUT_ENDPOINTS" > "$RECORD/endpoints"; {AWAIT_ROLES}',
}


def _run_in_allocation(out: Path, job: str, stubs: dict[str, str], nodes: int, tmp_path: Path,
                       roles: int = 0) -> Path:
    """Run ``jobs/<job>/launch.sh`` of the bundle ``out`` as if in a Slurm allocation of
    ``nodes`` nodes (node-0 …), with ``stubs`` on PATH and ``roles`` role stand-ins to wait
    for (``AWAIT_ROLES``); returns the folder the stubs record in."""
    bin_dir, record = write_stubs(tmp_path / "bin", stubs), tmp_path / "record"
    record.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "RLSPEC_TEST_NODES": str(nodes), "RLSPEC_TEST_ROLES": str(roles),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": f"node-[0-{nodes - 1}]",
           "SLURM_CPUS_PER_TASK": "96", "RLSPEC_RUN_DIR": str(tmp_path / "run"),
           "RLSPEC_PYTHON": "python", "RLSPEC_VLLM_PYTHON": "vllm-python", "HF_TOKEN": "x",
           "JUDGE_API_KEY": "y", "WANDB_API_KEY": "z"}
    bash_first_on_path(bin_dir)
    result = subprocess.run([BASH, f"jobs/{job}/launch.sh"], cwd=out, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return record


def test_245b_rl_job_splits_nodes_and_launches_every_role(tmp_path: Path) -> None:
    out = write_bundle(compile_spec(EXAMPLES["compassmax-245b"]).files, tmp_path / "b")
    record = _run_in_allocation(out, "rl", STUBS, 24, tmp_path, roles=24)

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
        if node % 2:  # the API server module would ignore --headless: vLLM's CLI runs it
            assert args[:4] == ["vllm", "-m", "vllm.entrypoints.cli.main", "serve"]
            assert "--headless" in args
            assert args[args.index("--data-parallel-start-rank") + 1] == "1"
        else:
            assert args[:3] == ["vllm", "-m", "vllm.entrypoints.openai.api_server"]
            assert "--headless" not in args
    assert (record / "endpoints").read_text().split() == [
        "http://node-0:8000,http://node-2:8000,http://node-4:8000,http://node-6:8000"]
    # Every step runs in the spec's container, which sees the bundle (its scripts) and the run
    # directory at their host paths, then the spec's mounts; env.sh loads no module inside.
    steps = (record / "srun").read_text().splitlines()
    assert len(steps) == 3  # rollout, trainer, driver
    mounts = f"{out.resolve()}:{out.resolve()},{tmp_path / 'run'}:{tmp_path / 'run'},/lustre:/lustre"
    for step in steps:
        assert f"--container-mounts={mounts} --export=ALL,RLSPEC_IN_CONTAINER=1" in step, step


def test_a_role_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    """rlspec_stop, on roles started as the launch scripts start them (`rlspec_run_on ... &`:
    the pid is the background subshell, the role its child): SIGTERM, then SIGKILL to what
    still runs (a task stuck in a collective must not hold the allocation)."""
    out = write_bundle(compile_spec(EXAMPLES["tiny"]).files, tmp_path / "b")
    script = ("source \"$BUNDLE/lib.sh\"; "
              "rlspec_run_on 127.0.0.1 1 sleep 300 & polite=$!; "
              "rlspec_run_on 127.0.0.1 1 bash -c 'trap \"\" TERM; echo $$ > stuck.pid; "
              "exec sleep 300' & stuck=$!; "
              "for ((i = 0; i < 100; i++)); do [[ -s stuck.pid ]] && break; sleep 0.1; done; "
              "RLSPEC_STOP_GRACE_S=1 rlspec_stop \"$polite\" \"$stuck\"; wait; "
              # gone, or a zombie its new parent has not reaped yet (a container's init may not)
              "rlspec_alive \"$(cat stuck.pid)\" && echo stuck-alive || echo stuck-gone")
    result = subprocess.run([BASH, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "BUNDLE": str(out)})
    assert result.stdout.strip().splitlines()[-1] == "stuck-gone", result.stdout + result.stderr


def test_the_roles_outlive_submitits_usr2_before_the_time_limit(tmp_path: Path) -> None:
    """submitit asks Slurm for USR2 on every step 90 s before the limit; the trainer and the
    engines ignore it (its default action would end them)."""
    out = write_bundle(compile_spec(EXAMPLES["compassmax-245b"]).files, tmp_path / "b")
    survive = 'kill -USR2 $$ && touch "$RECORD/survived.$SLURMD_NODENAME.$$"; '
    stubs = {**STUBS, "torchrun": survive + STUBS["torchrun"],
             "vllm-python": STUBS["vllm-python"].replace("exit 0; ", "exit 0; " + survive, 1)}
    record = _run_in_allocation(out, "rl", stubs, 24, tmp_path, roles=24)
    assert len(list(record.glob("survived.*"))) == 24  # 8 engine nodes, 16 trainer nodes


def test_245b_sft_runs_the_megatron_trainer_in_the_train_layout(tmp_path: Path) -> None:
    """With an sft section and train.backend megatron, the sft job starts torchrun on each of
    the 16 trainer nodes with the train layout's Megatron flags, the SFT's batch and learning
    rate, no RL checkpoint flags, and the HF policy it starts from as tokenizer."""
    compiled = compile_spec(EXAMPLES["compassmax-245b"], ["sft={steps: 10, lr: 2.0e-5}"])
    out = write_bundle(compiled.files, tmp_path / "b")
    stubs = {**SLURM_STUBS, "torchrun": 'echo "torchrun $*" >> "$RECORD/torchrun.$SLURMD_NODENAME"'}
    record = _run_in_allocation(out, "sft", stubs, 16, tmp_path)
    for rank in range(16):
        args = (record / f"torchrun.node-{rank}").read_text().split()
        assert args[args.index("--nnodes") + 1] == "16"
        assert args[args.index("--node-rank") + 1] == str(rank)
        assert args[args.index("--master-addr") + 1] == "node-0"
        assert args[args.index("-m") + 1] == "runtime.jobs.sft"
        assert args[args.index("--expert-model-parallel-size") + 1] == "8"
        assert args[args.index("--global-batch-size") + 1] == "32"  # sft.batch_size
        assert args[args.index("--lr") + 1] == args[args.index("--min-lr") + 1] == "2e-05"
        assert args[args.index("--tokenizer-model") + 1] == "/lustre/ckpt/compassmax-245b-sft"
        assert "--load" not in args and "--moe-enable-routing-replay" not in args
    # The embedded SFT (train.backend local) keeps the one-process-per-node launch.
    tiny = compile_spec(EXAMPLES["tiny"]).files
    assert "jobs/sft/train.sh" not in tiny
    assert "-m runtime.jobs.sft" in tiny["jobs/sft/launch.sh"]


@pytest.mark.parametrize("job", ["convert", "to_hf"])
def test_245b_conversions_run_in_the_train_layout(tmp_path: Path, job: str) -> None:
    """The HF → Megatron conversion (and, from a Megatron checkpoint, the one to HF) of a
    245 B model cannot run in one process: each starts torchrun on the 16 trainer nodes with
    the RL trainer's layout, none of its checkpoint or replay flags, and the tokenizer."""
    edits = ([] if job == "convert" else
             ["model.checkpoint_format=megatron", "model.tokenizer=/lustre/tokenizers/compass"])
    compiled = compile_spec(EXAMPLES["compassmax-245b"], edits)
    assert compiled.graph.jobs[job].nodes == 16
    out = write_bundle(compiled.files, tmp_path / "b")
    assert "#SBATCH --nodes=16" in (out / "jobs" / job / "sbatch.sh").read_text()
    rl = (out / "jobs" / "rl" / "train.sh").read_text()
    stubs = {**SLURM_STUBS, "torchrun": 'echo "torchrun $*" >> "$RECORD/torchrun.$SLURMD_NODENAME"'}
    record = _run_in_allocation(out, job, stubs, 16, tmp_path)
    tokenizer = ("/lustre/ckpt/compassmax-245b-sft" if job == "convert"
                 else "/lustre/tokenizers/compass")
    for rank in range(16):
        args = (record / f"torchrun.node-{rank}").read_text().split()
        assert args[args.index("--node-rank") + 1] == str(rank)
        assert args[args.index("-m") + 1] == "runtime.jobs.convert"
        for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                     "--expert-model-parallel-size", "--expert-tensor-parallel-size"):
            assert f"{flag} {args[args.index(flag) + 1]} " in rl, flag
        assert args[args.index("--tokenizer-model") + 1] == tokenizer
        assert "--bf16" in args
        assert not {"--load", "--save", "--moe-enable-routing-replay"} & set(args)


def test_colocated_rl_job_runs_trainer_and_engines_on_the_same_nodes(tmp_path: Path) -> None:
    """rollout.placement colocated: the allocation is the trainer's 2 nodes; each node runs a
    trainer task and a vLLM replica started with sleep mode, both job steps with srun
    --overlap (else the second would wait for the first to end)."""
    edits = ["rollout.placement=colocated", "rollout.nodes=2",
             "rollout.gpu_memory_utilization=0.28"]
    compiled = compile_spec(EXAMPLES["qwen3-30b-a3b"], edits)
    assert compiled.graph.jobs["rl"].nodes == 2
    out = write_bundle(compiled.files, tmp_path / "b")
    assert "#SBATCH --nodes=2" in (out / "jobs" / "rl" / "sbatch.sh").read_text()
    record = _run_in_allocation(out, "rl", STUBS, 2, tmp_path, roles=4)  # srun records steps
    for node in ("node-0", "node-1"):
        trainer = (record / f"torchrun.{node}").read_text().split()
        assert trainer[trainer.index("--master-addr") + 1] == "node-0"
        engine = (record / f"vllm.{node}").read_text().split()
        assert engine[engine.index("--host") + 1] == node and "--enable-sleep-mode" in engine
    steps = (record / "srun").read_text().splitlines()
    assert len(steps) == 2 and all("--nodelist=node-0,node-1 " in s for s in steps)
    assert all(" --overlap " in s for s in steps)
    # Disaggregated: engines on nodes of their own, no sleep mode, no overlapping steps.
    plain = compile_spec(EXAMPLES["qwen3-30b-a3b"]).files
    assert "--enable-sleep-mode" not in plain["jobs/rl/rollout.sh"]
    assert "--overlap" not in plain["lib.sh"]


@pytest.mark.parametrize(("job", "nodes", "model"), [
    ("screen", 4, "/lustre/ckpt/compassmax-mini"),  # the proxy model, on the screen's 4 nodes
    ("eval_before", 8, "/lustre/ckpt/compassmax-245b-sft"),  # the policy, on the rollout nodes
])
def test_245b_screen_and_eval_start_vllm_replicas_on_their_nodes(tmp_path: Path, job: str,
                                                                 nodes: int, model: str) -> None:
    """rollout.engine vllm: the job's nodes run the rollout layout's replicas (TP 8 × DP 2 over
    2 nodes: heads serve, the others run headless) of the job's model, and the job's entry
    point runs once, on the batch host, against every head's endpoint."""
    out = write_bundle(compile_spec(EXAMPLES["compassmax-245b"]).files, tmp_path / "b")
    bin_dir, record = write_stubs(tmp_path / "bin", STUBS), tmp_path / "record"
    record.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "RLSPEC_TEST_NODES": str(nodes), "RLSPEC_TEST_ROLES": str(nodes),
           "SLURM_JOB_ID": "42", "SLURMD_NODENAME": "node-0",
           "SLURM_JOB_NODELIST": f"node-[0-{nodes - 1}]", "SLURM_CPUS_PER_TASK": "96",
           "RLSPEC_RUN_DIR": str(tmp_path / "run"), "RLSPEC_PYTHON": "python",
           "RLSPEC_VLLM_PYTHON": "vllm-python", "HF_TOKEN": "x", "JUDGE_API_KEY": "y",
           "WANDB_API_KEY": "z"}
    bash_first_on_path(bin_dir)
    result = subprocess.run([BASH, f"jobs/{job}/launch.sh"], cwd=out, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for node in range(nodes):
        args = (record / f"vllm.node-{node}").read_text().split()
        assert args[args.index("--model") + 1] == model
        assert args[args.index("--host") + 1] == f"node-{node}"
        assert args[args.index("--tensor-parallel-size") + 1] == "8"
        assert ("--headless" in args) == bool(node % 2)
    assert not list(record.glob("torchrun.*"))
    heads = ",".join(f"http://node-{n}:8000" for n in range(0, nodes, 2))
    assert (record / "endpoints").read_text().split() == [heads]  # the job's one process


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
    ran = subprocess.run([BASH, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert ran.startswith("srun --overlap --nodes=1 --ntasks=1 --nodelist=n1 ")
    assert "--container-image=/lustre/images/rlspec-megatron-vllm.sqsh" in ran
    assert ran.rstrip().endswith("python3 -m runtime.jobs.rl")
    env.pop("SLURM_JOB_ID")  # a local run starts it directly
    ran = subprocess.run([BASH, "-c", script.replace("python3", "echo")], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert ran.strip() == "-m runtime.jobs.rl"


# --------------------------------------------------------------------------- Slurm resources


def sbatch_options(bundle: Path, job: str) -> dict[str, str]:
    """--name → value ("" for a flag) of a job's #SBATCH lines."""
    lines = (bundle / "jobs" / job / "sbatch.sh").read_text().splitlines()
    return dict((opt.removeprefix("#SBATCH --").partition("=")[::2]) for opt in lines
                if opt.startswith("#SBATCH --"))


@pytest.mark.parametrize("overrides, rl, export", [
    # Defaults: whole GPU nodes with all their memory; 12 cores per rank × 8 ranks per node.
    ((), {"cpus-per-task": "96", "mem": "0", "exclusive": ""}, {"cpus-per-task": "12"}),
    (("cluster.exclusive=false",), {"cpus-per-task": "96", "mem": "0"}, {"cpus-per-task": "12"}),
    (("cluster.mem_gb=512",), {"cpus-per-task": "96", "mem": "512G", "exclusive": ""},
     {"cpus-per-task": "12", "mem": "512G"}),
    (("cluster.cpus_per_task=4",), {"cpus-per-task": "32", "mem": "0", "exclusive": ""},
     {"cpus-per-task": "4"}),
])
def test_sbatch_asks_for_whole_gpu_nodes_and_cpus_for_every_rank(
        tmp_path: Path, overrides: tuple[str, ...], rl: dict, export: dict) -> None:
    """The RL job's node task runs 8 ranks (GPUs), the export job's one: cluster.cpus_per_task
    is per rank; --exclusive and --mem=0 (all the node's memory) by default where GPUs are."""
    out = write_bundle(compile_spec(EXAMPLES["compassmax-245b"], overrides).files, tmp_path / "b")
    manifest = json.loads((out / "manifest.json").read_text())
    for job, expected in (("rl", rl), ("export", export)):
        options = sbatch_options(out, job)
        got = {k: options[k] for k in ("cpus-per-task", "mem", "exclusive") if k in options}
        assert got == expected, job
        res = manifest["jobs"][job]["resources"]
        assert (str(res["cpus_per_task"]), res["mem"], res["exclusive"]) == (
            expected["cpus-per-task"], expected.get("mem"), "exclusive" in expected)


def test_srun_steps_get_the_cpus_of_the_node_task(tmp_path: Path) -> None:
    out = write_bundle(compile_spec(EXAMPLES["compassmax-245b"]).files, tmp_path / "b")
    bin_dir = write_stubs(tmp_path / "bin", {"srun": 'echo "srun $*"'})
    script = f'source "{out}/lib.sh"; rlspec_run_on node-1,node-2 2 python3 -m runtime.jobs.rl'
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7"}
    ran = subprocess.run([BASH, "-c", script], env={**env, "SLURM_CPUS_PER_TASK": "96"},
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert " --cpus-per-task=96 " in ran.stdout and " --ntasks-per-node=1 " in ran.stdout
    # Submitted without --cpus-per-task (an edited sbatch line): said, not run on 1 CPU.
    bare = subprocess.run([BASH, "-c", script], env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and "submitted without --cpus-per-task" in bare.stderr
    assert "srun" not in bare.stdout


# --------------------------------------------------------------------------- waiting for roles


# A child that ends once the script is about to wait (a file appears), or one that has ended
# (a zombie, not reaped) before the wait begins.
ON_GO = 'while [[ ! -e "$T/go" ]]; do sleep 0.01; done; '


@pytest.mark.parametrize("child, status, ended_before", [
    (ON_GO + "exit 7", 7, False),      # ends while the others run
    ("exit 5", 5, True),               # had ended before the wait began
    (ON_GO + "exit 0", 0, False),
    (ON_GO + "exit 127", 127, False),  # a command not found: not taken for "no child left"
])
def test_rlspec_wait_any_names_the_first_child_to_end_and_its_status(
        tmp_path: Path, child: str, status: int, ended_before: bool) -> None:
    out = write_bundle(compile_spec(EXAMPLES["tiny"]).files, tmp_path / "b")
    # ended: a zombie, or already reaped by bash
    before = ('while [[ $(cut -d" " -f3 /proc/$B/stat 2>/dev/null || echo Z) != Z ]]; do '
              'sleep 0.01; done' if ended_before else "")
    script = f"""set -euo pipefail
source {str(out / "lib.sh")!r}
T={str(tmp_path)!r}
sleep 60 & A=$!
( {child} ) & B=$!
sleep 60 & C=$!
{before}
touch "$T/go"
s=0
rlspec_wait_any FINISHED "$A" "$B" "$C" || s=$?
echo "$s $FINISHED $B"
kill -0 "$A" && kill -0 "$C" && echo "others running"
kill "$A" "$C"
"""
    result = subprocess.run([BASH, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    got, finished, expected, *rest = result.stdout.split()
    assert (int(got), finished) == (status, expected)
    assert " ".join(rest) == "others running"


# The tiny RL job run here (local, no Slurm) with a stand-in runtime: the role named by
# RLSPEC_TEST_FIRST ends with RLSPEC_TEST_STATUS once the two others have started; those run
# until their role's process is stopped (as the runtime's PR_SET_PDEATHSIG makes them).
RUNTIME_STUB = """
case " $* " in
  *" runtime.jobs.$RLSPEC_TEST_FIRST "*)
    while (( $(cat "$RECORD"/parent.* 2>/dev/null | wc -l) < 2 )); do sleep 0.05; done
    exit "$RLSPEC_TEST_STATUS";;
esac
echo "$PPID" > "$RECORD/partial.$$"; mv "$RECORD/partial.$$" "$RECORD/parent.$$"
while kill -0 "$PPID" 2>/dev/null; do sleep 0.1; done
"""


@pytest.mark.parametrize("first, status, rc, message", [
    ("train", 7, 7, "role 'train' exited with status 7; see {run}/logs/rl-train.log"),
    ("rollout_server", 0, 1, "role 'rollout' exited with status 0; see {run}/logs/rl-rollout.log"),
    ("rl", 0, 0, "rl: done"),
    ("rl", 3, 3, "role 'driver' exited with status 3; see {run}/logs/rl-driver.log"),
])
def test_rl_launch_ends_with_the_first_role_and_stops_the_others(
        tmp_path: Path, first: str, status: int, rc: int, message: str) -> None:
    out = write_bundle(compile_spec(EXAMPLES["tiny"]).files, tmp_path / "b")
    bin_dir = write_stubs(tmp_path / "bin", {"python": RUNTIME_STUB})
    record, run = tmp_path / "record", tmp_path / "run"
    bash_first_on_path(bin_dir)
    record.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "RLSPEC_RUN_DIR": str(run),
           "RLSPEC_PYTHON": "python", "RLSPEC_ROLLOUT_BASE_PORT": "1", "RLSPEC_TEST_FIRST": first,
           "RLSPEC_TEST_STATUS": str(status)}
    proc = subprocess.Popen([BASH, "jobs/rl/launch.sh"], cwd=out, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=30)  # the other roles would run for ever
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == rc, stderr
    assert message.format(run=run) in stderr
    # The roles still running when the first ended were stopped by the launch script.
    parents = [int(p.read_text()) for p in record.glob("parent.*")]
    assert len(parents) == 2
    assert not [pid for pid in parents if Path(f"/proc/{pid}").exists()]


# The roles of the tiny RL job as stand-ins: the driver records the endpoints it is given and
# ends the run once the rollout role has recorded its command line; the others wait.
REPLICA_STUB = """
case " $* " in
  *" runtime.jobs.rl "*)
    echo "$RLSPEC_ROLLOUT_ENDPOINTS" > "$RECORD/endpoints"
    while [[ ! -s $RECORD/rollout ]]; do sleep 0.05; done
    exit 0;;
  *" runtime.jobs.train "*) ;;
  *) echo "$*" > "$RECORD/rollout.partial"; mv "$RECORD/rollout.partial" "$RECORD/rollout";;
esac
while kill -0 "$PPID" 2>/dev/null; do sleep 0.1; done
"""


@pytest.mark.parametrize("gpus_per_node", [1, 2, 4])
def test_embedded_rollout_replicas_per_node_follow_gpus_per_node(tmp_path: Path,
                                                                 gpus_per_node: int) -> None:
    """train:local, rollout:local: the embedded trainer is one process, but the rollout node
    runs cluster.gpus_per_node embedded engine replicas (one slot each; runtime.launch starts
    them, replica i serving BASE_PORT + LOCAL_RANK i) and the driver gets one endpoint per
    replica."""
    from runtime.jobs.rollout_server import build_argv

    out = write_bundle(compile_spec(EXAMPLES["tiny"], [f"cluster.gpus_per_node={gpus_per_node}"])
                       .files, tmp_path / "b")
    bin_dir = write_stubs(tmp_path / "bin", {"python": REPLICA_STUB})
    record = tmp_path / "record"
    record.mkdir()
    bash_first_on_path(bin_dir)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "RLSPEC_RUN_DIR": str(tmp_path / "run"), "RLSPEC_PYTHON": "python",
           "RLSPEC_ROLLOUT_BASE_PORT": "18000"}
    result = subprocess.run([BASH, "jobs/rl/launch.sh"], cwd=out, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    args = (record / "rollout").read_text().split()
    served = args[args.index("-m", args.index("-m") + 1) + 1] if gpus_per_node > 1 else None
    if gpus_per_node > 1:
        assert args[:4] == ["-m", "runtime.launch", "--nproc-per-node", str(gpus_per_node)]
        assert served == "runtime.jobs.rollout_server"
    else:
        assert args[:2] == ["-m", "runtime.jobs.rollout_server"]
    server_args = args[args.index("runtime.jobs.rollout_server") + 1:]
    endpoints = (record / "endpoints").read_text().split()[0].split(",")
    assert len(endpoints) == gpus_per_node
    host = server_args[server_args.index("--host") + 1]
    ports = [build_argv(server_args, env={"LOCAL_RANK": str(r)}) for r in range(gpus_per_node)]
    assert endpoints == [f"http://{host}:{a[a.index('--port') + 1]}" for a in ports]
    assert [e.rsplit(":", 1)[1] for e in endpoints] == \
        [str(18000 + r) for r in range(gpus_per_node)]


def test_each_jobs_engines_serve_its_longest_request_and_record_experts_only_for_rl() -> None:
    """An eval's engines take eval.max_tokens (vLLM refuses a longer request than its
    --max-model-len: the job failed at its first request); the RL job's too where it
    evaluates in the run. Routed experts are recorded for R3 in the RL job only."""
    files = compile_spec(EXAMPLES["compassmax-245b"],
                         ["rollout.max_tokens=8192", "eval.max_tokens=30720"]).files
    prompt = 2048  # data.max_prompt_tokens of the example

    def flag(job: str, name: str) -> str | None:
        args = files[f"jobs/{job}/rollout.sh"].split()
        return args[args.index(name) + 1] if name in args else None

    assert flag("screen", "--max-model-len") == str(prompt + 8192)
    for job in ("eval_before", "eval_after", "rl"):  # the example evaluates every 50 steps
        assert flag(job, "--max-model-len") == str(prompt + 30720), job
    assert "--enable-return-routed-experts" in files["jobs/rl/rollout.sh"]
    for job in ("screen", "eval_before", "eval_after"):
        assert "--enable-return-routed-experts" not in files[f"jobs/{job}/rollout.sh"], job

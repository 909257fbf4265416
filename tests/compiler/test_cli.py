"""`rlspec` as a user runs it: exit codes, messages, files on disk, no tracebacks.

Where the process boundary matters (a traceback on stderr, the console script, a local run
of real launch scripts, what a fresh interpreter imports) the CLI runs in a subprocess;
elsewhere typer's CliRunner runs it in-process, which sees the same exit codes and output
(an escaped exception shows as `result.exception`, not SystemExit). The CLI's rich consoles
fix their width when compiler.cli is imported (from COLUMNS, which pytest-xdist sets to 80),
so each in-process call sets it: wide by default, 80 (what a pipe gets) where cropping is
the point; subprocesses get COLUMNS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from compiler import __version__
from compiler import cli as cli_module
from compiler.api import validate
from compiler.cli import app
from spec.errors import SpecError, dotted
from tests.helpers import status_rows, write_stubs

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny" / "spec.yaml"
SINGLE = ROOT / "examples" / "qwen3-30b-a3b.yaml"
BIG = ROOT / "examples" / "compassmax-245b.yaml"
EXAMPLES = {"tiny": TINY, "qwen3-30b-a3b": SINGLE, "compassmax-245b": BIG}
SECRETS = ("HF_TOKEN", "WANDB_API_KEY", "JUDGE_API_KEY")
WIDE = "250"


# --------------------------------------------------------------------------- helpers


def cli(*args: object, env: Mapping[str, str | None] | None = None, columns: str = WIDE) -> Result:
    """Run `rlspec ARGS` in-process, its consoles `columns` wide."""
    consoles = [(c, c._width) for c in (cli_module.out, cli_module.err)]
    for console, _ in consoles:
        console.width = int(columns)
    try:
        return CliRunner().invoke(app, [str(a) for a in args],
                                  env={"COLUMNS": columns, **(env or {})})
    finally:
        for console, width in consoles:
            console._width = width


def run(*args: object, cwd: Path = ROOT, env: Mapping[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m compiler.cli ARGS` in a subprocess, as a user's shell would."""
    full_env = {**os.environ, "COLUMNS": WIDE, **(env or {})}
    return subprocess.run([sys.executable, "-m", "compiler.cli", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def no_traceback(result: Result) -> None:
    """The CLI ended through its own exit, not an escaped exception."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ": error: " in line or "error:" in line[:7]]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def compile_to(spec: Path, out: Path, *extra: object, env=None) -> Path:
    result = cli("compile", spec, "-o", out, *extra, env=env)
    assert result.exit_code == 0, result.output
    return out


def closure(manifest: dict, roots: set[str]) -> set[str]:
    """Jobs that depend, directly or not, on any of `roots`."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, job in manifest["jobs"].items():
            if name not in found and set(job["depends_on"]) & (roots | found):
                found.add(name)
                changed = True
    return found


@pytest.fixture(scope="module")
def bundle_245b(tmp_path_factory) -> Path:
    """The 245B example compiled by the real CLI in a subprocess (shared: never modified)."""
    out = tmp_path_factory.mktemp("cli") / "b245"
    result = run("compile", BIG, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "6 jobs" in result.stdout
    return out


@pytest.fixture
def bundle_copy(bundle_245b: Path, tmp_path: Path) -> Path:
    """A private copy of the 245B bundle, free to edit."""
    return Path(shutil.copytree(bundle_245b, tmp_path / "b245"))


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_validate_accepts_the_examples(name: str) -> None:
    result = cli("validate", EXAMPLES[name])
    assert result.exit_code == 0, result.output
    assert "valid" in result.stdout
    assert not error_lines(result.stderr)


def _three_mistakes(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """qwen3-30b-a3b.yaml with a mistake in cluster, train and rollout: path → line."""
    text = SINGLE.read_text()
    edits = {
        "cluster.gpus_per_node": ("  gpus_per_node: 8\n", "  gpus_per_node: 0\n"),
        "train.recompute": ("  recompute: full ", "  recompute: fulll "),
        "rollout.gpu_memory_utilisation": ("  gpu_memory_utilization: 0.85\n",
                                           "  gpu_memory_utilisation: 0.85\n"),
    }
    lines = {}
    for path, (old, new) in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
        lines[path] = text[: text.index(new)].count("\n") + 1
    spec = tmp_path / "three.yaml"
    spec.write_text(text)
    return spec, lines


def test_validate_reports_every_mistake_with_its_line_and_no_traceback(tmp_path: Path) -> None:
    spec, lines = _three_mistakes(tmp_path)
    result = run("validate", spec.name, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("3 problems in the spec:"), result.stderr
    for path, line in lines.items():
        assert re.search(rf"^three\.yaml:{line}: error: {re.escape(path)}: ", result.stderr,
                         re.M), (path, line, result.stderr)
    assert "did you mean 'gpu_memory_utilization'?" in result.stderr
    assert "did you mean 'full'?" in result.stderr
    assert result.stdout == ""


def _edit(text: str, edits: dict[str, tuple[str, str]]) -> tuple[str, dict[str, int]]:
    lines = {}
    for path, (old, new) in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
        lines[path] = text[: text.index(new)].count("\n") + 1
    return text, lines


def test_validate_reports_shape_section_and_compiler_problems_in_one_run(tmp_path: Path) -> None:
    """A bad key (cluster), a section's rule (architecture) and a compiler check (batch
    arithmetic) used to take three rounds of `rlspec validate`; one run reports all three."""
    text, lines = _edit(SINGLE.read_text(), {
        "model.architecture.mla": ("    head_dim: 128\n",
                                   "    head_dim: 128\n    mla: {kv_lora_rank: 512}\n"),
        "cluster.time_limit": ('  time_limit: "24:00:00"\n', "  time_limit: 24h\n"),
        "train.micro_batch_size": ("  micro_batch_size: 1 ", "  micro_batch_size: 3 "),
        "train.global_batch_size": ("  global_batch_size: 128\n", "  global_batch_size: 128\n"),
    })
    lines["model.architecture"] = text[: text.index("  architecture:\n")].count("\n") + 1
    spec = tmp_path / "mixed.yaml"
    spec.write_text(text)
    result = run("validate", spec.name, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    found = re.findall(r"^mixed\.yaml:(\d+): error: ([\w.]+): (.*)$", result.stderr, re.M)
    assert [(int(n), path) for n, path, _ in found] == [
        (lines["model.architecture"], "model.architecture"),
        (lines["cluster.time_limit"], "cluster.time_limit"),
        (lines["train.global_batch_size"], "train.global_batch_size"),
    ], result.stderr
    assert found[0][2] == "an 'mla' section is given but attention is 'gqa'"
    assert found[2][2].startswith("global_batch_size 128 is not a multiple of micro_batch_size")
    assert result.stderr.startswith("3 problems in the spec:")


def test_a_compiler_check_that_needs_a_bad_value_is_skipped(tmp_path: Path) -> None:
    """train.nodes does not validate: the checks of the trainer's world size are skipped (no
    made-up error), the checks that do not need it still report, each at its line."""
    text, lines = _edit(SINGLE.read_text(), {
        "train.nodes": ("  nodes: 2\n  parallelism:\n    tensor: 4",
                        "  nodes: '2'\n  parallelism:\n    tensor: 3"),
        "rollout.parallelism.tensor": ("    tensor: 2\n", "    tensor: 4\n"),
    })
    spec = tmp_path / "skip.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError) as info:
        validate(spec)
    problems = [(dotted(p.path), p.line, p.message) for p in info.value.problems]
    assert problems[0][:2] == ("train.nodes", lines["train.nodes"])
    assert not [p for p in problems if "world size" in p[2]], problems  # needs train.nodes
    assert ("train.parallelism.tensor", lines["train.nodes"] + 2,
            "num_attention_heads 32 is not a multiple of tensor parallel size 3") in [
        (path, line, message[:66]) for path, line, message in problems]
    assert [p[:2] for p in problems if p[0].startswith("rollout")] == [
        ("rollout.parallelism", lines["rollout.parallelism.tensor"] - 1)]  # TP·DP 16 > 8 GPUs


@pytest.mark.parametrize(("override", "path", "secret"), [
    ("cluster.env.HF_TOKEN=hf_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3h", "cluster.env.HF_TOKEN",
     "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3h"),
    ("cluster.env.WANDB_KEY=0123456789abcdef", "cluster.env.WANDB_KEY", "0123456789abcdef"),
    ("reward.judge={type: http, model: m, url: 'https://bob:hunter2pw@judge.example/v1'}",
     "reward.judge.url", "hunter2pw"),
], ids=["hf-token", "secret-name", "judge-url-password"])
def test_validate_refuses_a_secret_without_showing_it(override: str, path: str,
                                                      secret: str) -> None:
    """A secret would be written into 8 files of the bundle: exit 2, the field and a hint on
    stderr, the value masked (the --set text too)."""
    result = cli("validate", TINY, "--set", override)
    assert result.exit_code == 2
    no_traceback(result)
    assert re.search(rf"^--set: error: {re.escape(path)}: .*\n    hint: ", result.stderr, re.M)
    assert secret not in result.stderr + result.stdout


def test_validate_accepts_common_variables_in_cluster_env() -> None:
    """TOKENIZERS_PARALLELISM was refused as a secret (its name contains TOKEN)."""
    result = cli("validate", TINY, "--set",
                 "cluster.env={TOKENIZERS_PARALLELISM: 'false', NCCL_DEBUG: WARN, "
                 "HF_HUB_OFFLINE: '1', WANDB_PROJECT: rl, PYTORCH_CUDA_ALLOC_CONF: "
                 "'expandable_segments:True'}")
    assert result.exit_code == 0, result.output
    assert not error_lines(result.stderr)


def test_a_misspelt_section_gets_did_you_mean(tmp_path: Path) -> None:
    spec = tmp_path / "typo.yaml"
    spec.write_text(TINY.read_text().replace("\nrollout:\n", "\nrollot:\n"))
    result = cli("validate", spec)
    assert result.exit_code == 2
    no_traceback(result)
    assert re.search(r"typo\.yaml:\d+: error: rollot: unknown key 'rollot'", result.stderr)
    assert "did you mean 'rollout'?" in result.stderr


@pytest.mark.parametrize(("text", "message"), [
    (None, "file not found"),
    ("", "the file is empty"),
    ("# only a comment\n", "no content"),
    ("name: x\nmodel: [1, 2\ntrain: {}\n", "invalid YAML"),
    ("- name: x\n- model: {}\n", "the top level of the file is a list"),
], ids=["missing", "empty", "comments-only", "malformed", "list"])
def test_unreadable_specs_get_one_clear_line(tmp_path: Path, text: str | None,
                                             message: str) -> None:
    spec = tmp_path / "spec.yaml"
    if text is not None:
        spec.write_text(text)
    result = cli("validate", spec)
    assert result.exit_code == 2
    no_traceback(result)
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"{spec}") and message in errors[0], errors[0]


def test_set_overrides_change_the_plan_or_are_reported() -> None:
    before = json.loads(cli("inspect", SINGLE, "--json").stdout)
    after = cli("inspect", SINGLE, "--json", "--set", "train.nodes=4")
    assert after.exit_code == 0, after.output
    plan = json.loads(after.stdout)["plan"]
    assert before["plan"]["data_parallel"] == 4 and plan["data_parallel"] == 8
    assert plan["train_world_size"] == 32
    ok = cli("validate", SINGLE, "--set", "train.nodes=4")
    assert ok.exit_code == 0 and "valid" in ok.stdout

    for bad in ("train.nodes=abc", "train.nodes", "train..nodes=1"):
        result = cli("validate", SINGLE, "--set", bad)
        assert result.exit_code == 2, bad
        no_traceback(result)
        assert "--set" in result.stderr, result.stderr


# --------------------------------------------------------------------------- compile


def test_compile_writes_a_complete_bundle(bundle_245b: Path) -> None:
    files = tree(bundle_245b)
    manifest = json.loads(files["manifest.json"])
    for rel in ("manifest.json", "spec.yaml", "spec.resolved.yaml", "graph.json", "graph.dot",
                "env.sh", "lib.sh", "submit.sh"):
        assert rel in files, rel
    assert manifest["order"] == ["convert", "eval_before", "screen", "rl", "eval_after", "export"]
    for name in manifest["order"]:
        for leaf in ("launch.sh", "sbatch.sh", "config.json"):
            assert f"jobs/{name}/{leaf}" in files, (name, leaf)
        json.loads(files[f"jobs/{name}/config.json"])
    # The user's text, byte for byte: comments and all.
    assert files["spec.yaml"] == BIG.read_bytes()
    assert b"# --- router_replay" in files["spec.yaml"]
    # The manifest describes every other file, by hash.
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256(files[rel]).hexdigest() == digest, rel
    # Scripts are executable, data is not.
    for rel in files:
        executable = os.access(bundle_245b / rel, os.X_OK)
        assert executable == rel.endswith(".sh"), rel
    json.loads(files["graph.json"])


def test_compiling_twice_gives_byte_identical_trees(bundle_245b: Path, tmp_path: Path) -> None:
    again = compile_to(BIG, tmp_path / "elsewhere" / "again")
    assert tree(again) == tree(bundle_245b)


def test_compile_force_says_what_it_kept(tmp_path: Path) -> None:
    out = compile_to(TINY, tmp_path / "bundle")
    (out / "runs").mkdir()
    forced = cli("compile", TINY, "-o", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert "kept what the old bundle did not write: runs" in forced.stdout
    assert (out / "runs").is_dir()


def test_compile_refuses_an_existing_dir_unless_forced(tmp_path: Path) -> None:
    out = compile_to(TINY, tmp_path / "bundle")
    before = tree(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    refused = cli("compile", SINGLE, "-o", out)
    assert refused.exit_code == 2
    no_traceback(refused)
    assert "--force" in refused.stderr
    assert tree(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps

    forced = cli("compile", SINGLE, "-o", out, "--force")
    assert forced.exit_code == 0, forced.output
    after = tree(out)
    assert json.loads(after["manifest.json"])["name"] == "qwen3-30b-a3b-espo"
    assert after["spec.yaml"] == SINGLE.read_bytes()
    assert not any(rel.startswith(("jobs/data/", "jobs/init/")) for rel in after)  # tiny's jobs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp or .old dirs


def test_an_invalid_spec_writes_nothing(tmp_path: Path) -> None:
    spec, _ = _three_mistakes(tmp_path)
    parent = tmp_path / "out"
    parent.mkdir()
    result = cli("compile", spec, "-o", parent / "bundle")
    assert result.exit_code == 2
    no_traceback(result)
    assert "3 problems" in result.stderr
    assert list(parent.iterdir()) == []  # neither the bundle nor a temporary sibling

    nested = cli("compile", spec, "-o", tmp_path / "new" / "bundle")
    assert nested.exit_code == 2 and not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- inspect


def test_inspect_a_spec_and_its_bundle_show_the_same_plan(bundle_245b: Path) -> None:
    of_spec = cli("inspect", BIG, "--json")
    of_bundle = cli("inspect", bundle_245b, "--json")
    assert of_spec.exit_code == of_bundle.exit_code == 0, of_bundle.output
    assert json.loads(of_spec.stdout) == json.loads(of_bundle.stdout)
    summary = cli("inspect", bundle_245b)
    assert summary.exit_code == 0 and summary.stdout == cli("inspect", BIG).stdout


def test_inspect_of_a_bundle_keeps_its_overrides(tmp_path: Path) -> None:
    out = compile_to(SINGLE, tmp_path / "b", "--set", "train.nodes=2")
    plan = json.loads(cli("inspect", out, "--json").stdout)["plan"]
    assert plan["train_world_size"] == 16 and plan["data_parallel"] == 4


def test_inspect_says_what_each_role_of_the_rl_job_runs_on(tmp_path: Path) -> None:
    """The roles' engines and devices, and how the weights reach the engines, as the runtime
    declares them (runtime.capabilities.engines)."""
    tiny = str(TINY)
    rl = json.loads(cli("inspect", tiny, "--json").stdout)["engines"]["rl"]
    assert rl == ["trainer: embedded HF trainer on CPU", "rollout: embedded rollout server on CPU",
                  "driver: rewards and filters on CPU",
                  "weights: each step's folder, reloaded by the engines (disk)"]
    ipc = json.loads(cli("inspect", tiny, "--set", "system.weight_sync=ipc", "--json").stdout)
    assert ipc["engines"]["rl"][3].startswith("weights: mapped from the trainer's shared memory")
    summary = cli("inspect", tiny, "--set", "system.weight_sync=ipc").stdout
    assert "mapped from the trainer's shared memory" in " ".join(summary.split())
    nccl = json.loads(cli("inspect", tiny, "--set", "system.weight_sync=nccl", "--json").stdout)
    assert nccl["engines"]["rl"][3].startswith("weights: broadcast by the trainer over gloo")


def test_inspect_json_is_the_plan(bundle_245b: Path) -> None:
    result = cli("inspect", bundle_245b, "--json")
    data = json.loads(result.stdout)
    plan = data["plan"]
    assert data["name"] == "compassmax-245b"
    assert plan["train_world_size"] == 128 and plan["data_parallel"] == 4
    assert plan["expert_tensor_parallel"] == 1 and plan["expert_data_parallel"] == 2
    assert plan["expert_tensor_defaulted"] is False
    assert plan["rl_nodes"] == 24 and plan["micro_batches_per_step"] == 256
    assert plan["routing_bytes_per_token"] == 256 and plan["routing_dtype"] == "uint8"
    assert plan["pipeline_layers"] == [8] * 8
    assert [j["name"] for j in data["jobs"]] == ["convert", "eval_before", "screen", "rl", "eval_after", "export"]


def test_inspect_graph_tree_lists_every_job(bundle_245b: Path) -> None:
    manifest = json.loads((bundle_245b / "manifest.json").read_text())
    result = cli("inspect", bundle_245b, "--graph", "tree")
    assert result.exit_code == 0
    for name in manifest["order"]:
        assert re.search(rf"\b{name} \(\d+ node\(s\)\)", result.stdout), name
    assert "after convert: reads policy_megatron" in result.stdout


def test_inspect_graph_dot_is_valid_dot(bundle_245b: Path) -> None:
    result = cli("inspect", bundle_245b, "--graph", "dot")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("//") and lines[1].startswith("digraph ")
    assert result.stdout == (bundle_245b / "graph.dot").read_text()
    for name in json.loads((bundle_245b / "manifest.json").read_text())["order"]:
        assert f'"{name}" [label=' in result.stdout
    if shutil.which("dot"):
        check = subprocess.run(["dot", "-Tcanon"], input=result.stdout, capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
    else:
        assert result.stdout.rstrip().endswith("}")


def test_inspect_job_shows_that_jobs_files(bundle_245b: Path) -> None:
    result = cli("inspect", bundle_245b, "--job", "rl")
    assert result.exit_code == 0
    for leaf in ("config.json", "launch.sh", "rollout.sh", "sbatch.sh", "train.sh"):
        assert f"jobs/rl/{leaf}" in result.stdout, leaf
    assert "jobs/convert/" not in result.stdout
    shown = {line.rstrip() for line in result.stdout.splitlines()}
    for line in (bundle_245b / "jobs" / "rl" / "launch.sh").read_text().splitlines():
        assert line.rstrip() in shown, line


def test_inspect_job_piped_keeps_whole_script_lines(bundle_245b: Path) -> None:
    result = cli("inspect", bundle_245b, "--job", "rl", columns="80")
    shown = {line.rstrip() for line in result.stdout.splitlines()}
    for leaf in ("launch.sh", "sbatch.sh", "train.sh"):
        for line in (bundle_245b / "jobs" / "rl" / leaf).read_text().splitlines():
            assert line.rstrip() in shown, line


def test_inspect_graph_tree_piped_keeps_whole_summaries(bundle_245b: Path) -> None:
    result = cli("inspect", bundle_245b, "--graph", "tree", columns="80")
    manifest = json.loads((bundle_245b / "manifest.json").read_text())
    for name, job in manifest["jobs"].items():
        assert job["summary"] in result.stdout, name


def test_inspect_unknown_job_lists_the_jobs(bundle_245b: Path) -> None:
    result = cli("inspect", bundle_245b, "--job", "nope")
    assert result.exit_code == 2  # bad input
    no_traceback(result)
    assert "no job 'nope'" in result.stderr
    assert "convert, eval_before, screen, rl, eval_after, export" in result.stderr
    bad = cli("inspect", bundle_245b, "--graph", "pie")
    assert bad.exit_code == 2 and "tree, dot or png" in bad.stderr


def test_inspect_245b_summary_shows_grids_memory_and_replay() -> None:
    result = cli("inspect", BIG)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "ETP 1 × EP 8 × PP 8 × expert-DP 2" in text
    assert "TP 4 × PP 8 × CP 1 × DP 4" in text
    assert re.search(r"trainer memory\s*│\s*[\d.]+ GB of 80\.0 GB", text)
    assert re.search(r"rollout memory\s*│\s*[\d.]+ GB of", text)
    assert "uint8 ids, 256 bytes per token" in text
    assert "defaulted to TP" not in text


def test_inspect_shows_an_etp_defaulted_to_tp() -> None:
    result = cli("inspect", SINGLE, "--set", "train.parallelism.expert_tensor=null",
                 "--set", "train.parallelism.expert=2")
    assert "ETP 4 (defaulted to TP) × EP 2" in result.stdout
    assert "Megatron uses ETP = TP = 4" in result.stdout  # the warning explains it
    # The Megatron trainer runs ETP = TP (tests/megatron): a warning, no refusal.
    assert result.exit_code == 0, result.output
    assert "job rl would refuse" not in result.output


# --------------------------------------------------------------------------- submit


def _with_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`sbatch` and `srun` on PATH (stubs that fail if run: only their presence counts)."""
    stubs = write_stubs(tmp_path / "bin-with-slurm", {
        "sbatch": "echo 'sbatch stub: not for running' >&2; exit 3",
        "srun": "echo 'srun stub: not for running' >&2; exit 3"})
    monkeypatch.setenv("PATH", f"{stubs}{os.pathsep}{os.environ['PATH']}")


def test_submit_dry_run_prints_the_slurm_requests(
        bundle_245b: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _with_slurm(monkeypatch, tmp_path)
    result = cli("submit", bundle_245b, "--dry-run")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    manifest = json.loads((bundle_245b / "manifest.json").read_text())
    assert payload["backend"] == "slurm"
    requests = payload["requests"]
    assert [r["job"] for r in requests] == manifest["order"]
    for r in requests:
        job = manifest["jobs"][r["job"]]
        assert r["depends_on"] == job["depends_on"]
        assert r["command"][0] == "bash"
        assert Path(r["command"][1]) == (bundle_245b / job["launch"]).resolve()
        p = r["parameters"]
        assert p["nodes"] == job["resources"]["nodes"]
        assert p.get("gpus_per_node", 0) == job["resources"]["gpus_per_node"]
        assert p.get("gpus_per_node") == (None if r["job"] == "export" else 8)
        assert p["time"] == 7 * 24 * 60  # 7-00:00:00, in minutes
        assert p["partition"] == "h100" and p["account"] == "llm-rl" and p["qos"] == "high"
        assert p["use_srun"] is False
        assert p["job_name"] == f"compassmax-245b-{r['job']}"
        # GPU jobs get whole nodes and all their memory; cluster.cpus_per_task (12) is per
        # rank, and the node's one task runs 8 ranks (the export job: one).
        gpus = r["job"] != "export"
        assert p["cpus_per_task"] == (96 if gpus else 12)
        assert (p.get("exclusive"), p.get("mem")) == ((True, "0") if gpus else (None, None))
    by_job = {r["job"]: r for r in requests}
    assert by_job["rl"]["depends_on"] == ["convert", "screen"]
    assert by_job["rl"]["parameters"]["nodes"] == 24
    assert not (bundle_245b / "submission.json").exists()


def test_submit_dry_run_of_a_local_spec(tmp_path: Path) -> None:
    out = compile_to(TINY, tmp_path / "tiny")
    payload = json.loads(cli("submit", out, "--dry-run").stdout)
    assert payload["backend"] == "local"
    assert [r["job"] for r in payload["requests"]] == json.loads(
        (out / "manifest.json").read_text())["order"]
    assert all(set(r["parameters"]) == {"job_name"} for r in payload["requests"])


def test_a_failed_local_run_shows_the_end_of_the_failed_jobs_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rlspec run` whose job failed: exit 1, the failed jobs, and the last lines of the first
    failed job's log and of the role log it points to, where the error is (a CI log then
    holds it, not just the log's path)."""
    from compiler import runner

    role = tmp_path / "rl-rollout.log"
    role.write_text("loading\nOSError: [Errno 98] Address already in use\n")
    log = tmp_path / "7_0_log.err"
    log.write_text("".join(f"line {i}\n" for i in range(30))
                   + f"[rlspec 01:02:03] rl: role 'rollout' exited with status 1; see {role}\n")

    def failed_run(compiled: object, out: Path, *, echo: object = None) -> dict:
        return {"jobs": {"data": {"state": "COMPLETED", "log": "x"},
                         "rl": {"state": "FAILED", "log": str(log)},
                         "export": {"state": "PENDING"}}}

    monkeypatch.setattr(runner, "run_local", failed_run)
    result = cli("run", TINY, "--out", tmp_path / "run", env={"RLSPEC_PYTHON": sys.executable})
    assert result.exit_code == 1, result.output
    assert f"jobs did not complete: rl, export; logs: {log}, None" in result.stderr
    job, rollout = result.stderr.split(f"last lines of {log}:\n")[1].split(
        f"\nlast lines of {role}:\n")
    assert len(job.splitlines()) == 20 and job.splitlines()[0] == "  line 11"
    assert rollout.splitlines() == ["  loading", "  OSError: [Errno 98] Address already in use"]


def test_a_local_submit_gives_every_job_the_spec_time_limit(tmp_path: Path, monkeypatch) -> None:
    """submitit's local executor runs each job with timeout_min from cluster.time_limit (its
    own default would kill a job after 2 minutes)."""
    import submitit

    from compiler.submit import submit

    limits: list[int] = []

    class Job:
        job_id, paths = "1", type("Paths", (), {"stderr": "log"})()

        def result(self) -> None:
            return None

    class Executor:
        def __init__(self, folder: Path) -> None:
            pass

        def update_parameters(self, **params: object) -> None:
            limits.append(params["timeout_min"])  # type: ignore[arg-type]

        def submit(self, fn: object) -> Job:
            return Job()

    monkeypatch.setattr(submitit, "LocalExecutor", Executor)
    for limit, minutes in (("0:07:30", 8), ("1-02:00:00", 1560)):
        limits.clear()
        out = compile_to(TINY, tmp_path / limit, "--set", f"cluster.time_limit={limit!r}")
        record = submit(out, backend="local", echo=lambda *_: None)
        assert set(record.jobs) == set(json.loads((out / "manifest.json").read_text())["order"])
        assert limits == [minutes] * len(record.jobs)


# Every submit below must stop at its preflight; should one not, the jobs fail at once.
SAFE = {"RLSPEC_RUN_DIR": "/dev/null/x"}


def test_submit_refuses_a_submitted_bundle(bundle_copy: Path) -> None:
    (bundle_copy / "submission.json").write_text('{"backend": "local", "jobs": {}}\n')
    result = cli("submit", bundle_copy, "--local", env=SAFE)
    assert result.exit_code == 2
    no_traceback(result)
    assert "already submitted" in result.stderr and "--force" in result.stderr


def test_submit_refuses_an_edited_bundle(bundle_copy: Path) -> None:
    launch = bundle_copy / "jobs" / "rl" / "launch.sh"
    launch.write_text(launch.read_text() + "echo edited by hand\n")
    result = cli("submit", bundle_copy, "--local", env={**SAFE, **dict.fromkeys(SECRETS, "x")})
    assert result.exit_code == 2
    no_traceback(result)
    assert "jobs/rl/launch.sh" in result.stderr and "recompile" in result.stderr
    assert not (bundle_copy / "submission.json").exists()


def test_submit_names_unset_passthrough_variables_and_never_writes_values(
        tmp_path: Path) -> None:
    values = {"HF_TOKEN": "hf_s3cr3t_value_1", "WANDB_API_KEY": "wandb_s3cr3t_value_2"}
    env = {**SAFE, **values, "JUDGE_API_KEY": None}
    out = compile_to(BIG, tmp_path / "b", env=env)
    result = cli("submit", out, "--local", env=env)
    assert result.exit_code == 2
    no_traceback(result)
    assert "JUDGE_API_KEY" in result.stderr and "export" in result.stderr
    assert "HF_TOKEN" not in result.stderr
    for rel, data in tree(out).items():
        for value in values.values():
            assert value.encode() not in data, rel
    assert not (out / "submission.json").exists()


# --------------------------------------------------------------------------- a failed local run


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny example submitted locally where every launch script fails (at its mkdir)."""
    out = tmp_path_factory.mktemp("local") / "tiny"
    compile_to(TINY, out)
    result = run("submit", out, "--local", env={"RLSPEC_RUN_DIR": "/dev/null/x"})
    return out, result


def test_a_failed_local_run_exits_1(failed_run) -> None:
    out, result = failed_run
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "did not complete" in result.stderr and "rlspec status" in result.stderr
    assert (out / "submission.json").is_file()


def test_status_shows_the_failed_job_and_its_cancelled_dependents(failed_run) -> None:
    out, _ = failed_run
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["order"][0]
    result = run("status", out)
    assert result.returncode == 0, result.stderr
    rows = status_rows(result.stdout)
    assert set(rows) == set(manifest["order"]), result.stdout
    assert rows[first][2] == "FAILED"
    failed = {name for name, cells in rows.items() if cells[2] == "FAILED"}
    dependents = closure(manifest, failed)
    assert dependents >= {"rl", "eval_after", "export"}
    for name in dependents:
        assert rows[name][2] == "CANCELLED", name
        assert "did not complete" in rows[name][3]
    assert all(cells[2] in ("FAILED", "CANCELLED") for cells in rows.values())
    log = re.search(rf"^{first} failed; log: (\S+)$", result.stdout, re.M)
    assert log, result.stdout
    assert Path(log.group(1)).is_file() and Path(log.group(1)).is_relative_to(out)


def test_status_lists_jobs_in_graph_order(failed_run) -> None:
    out, _ = failed_run
    result = cli("status", out)
    order = json.loads((out / "manifest.json").read_text())["order"]
    assert list(status_rows(result.stdout)) == order


# --------------------------------------------------------------------------- status, cancel


def test_status_of_an_unsubmitted_bundle(bundle_245b: Path, tmp_path: Path) -> None:
    result = cli("status", bundle_245b)
    assert result.exit_code == 2
    no_traceback(result)
    assert "has not been submitted" in result.stderr and "rlspec submit" in result.stderr
    for command in ("status", "submit", "cancel"):  # another folder is bad input
        not_a_bundle = cli(command, tmp_path)
        assert not_a_bundle.exit_code == 2, (command, not_a_bundle.output)
        assert "not an rlspec bundle" in not_a_bundle.stderr
        assert "rlspec compile" in not_a_bundle.stderr


def _slurm_record(bundle: Path) -> None:
    (bundle / "submission.json").write_text(json.dumps({"backend": "slurm", "jobs": {
        "convert": {"id": "4242", "state": "SUBMITTED", "log": "logs/4242"}}}))


def _without_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A PATH with only a python: Slurm's commands are absent even where Slurm is installed."""
    bin_dir = tmp_path / "bin-without-slurm"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert shutil.which("squeue") is None and shutil.which("scancel") is None


def test_status_of_a_slurm_bundle_without_slurm_is_a_clear_error(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _without_slurm(monkeypatch, tmp_path)
    _slurm_record(bundle_copy)
    result = cli("status", bundle_copy)
    no_traceback(result)
    assert result.exit_code == 2 and "`squeue` is not available here" in result.stderr


def test_cancel_without_slurm_is_a_clear_error(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _without_slurm(monkeypatch, tmp_path)
    _slurm_record(bundle_copy)
    result = cli("cancel", bundle_copy)
    no_traceback(result)
    assert result.exit_code == 2 and "`scancel` is not available here" in result.stderr


@pytest.mark.parametrize("present", [(), ("sbatch",), ("srun",)])
@pytest.mark.parametrize("dry_run", [False, True])
def test_submit_of_a_slurm_bundle_without_slurm_is_refused_and_runs_nothing(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        present: tuple[str, ...], dry_run: bool) -> None:
    """No silent local run of a Slurm bundle: exit 2, the missing command named, what to do,
    and nothing started or recorded (every preflight passes, so only the check stops it)."""
    _without_slurm(monkeypatch, tmp_path)
    write_stubs(tmp_path / "bin-without-slurm", {c: "exit 3" for c in present})
    args = ("--dry-run",) if dry_run else ()
    result = cli("submit", bundle_copy, *args, env={**SAFE, **dict.fromkeys(SECRETS, "x")})
    no_traceback(result)
    assert result.exit_code == 2, result.output
    missing = [c for c in ("sbatch", "srun") if c not in present]
    for command in ("sbatch", "srun"):
        assert (f"`{command}`" in result.stderr) == (command in missing), result.stderr
    assert "not on PATH" in result.stderr and "nothing was submitted" in result.stderr
    assert "login node" in result.stderr and "cluster.scheduler: local" in result.stderr
    assert len(error_lines(result.stderr)) == 1
    assert result.stdout == ""  # a dry run prints no requests for a backend it cannot use
    assert not (bundle_copy / "submission.json").exists()
    assert not (bundle_copy / "logs").exists()


def test_submit_local_of_a_slurm_bundle_is_what_was_asked(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _without_slurm(monkeypatch, tmp_path)
    result = cli("submit", bundle_copy, "--dry-run", "--local")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["backend"] == "local"


def test_cancel_of_a_local_run_is_refused(failed_run) -> None:
    out, _ = failed_run
    result = cli("cancel", out)
    assert result.exit_code == 2 and "local runs" in result.stderr


# --------------------------------------------------------------------------- tracebacks


@pytest.mark.parametrize("override", ["filters[0]=[history]", "filters[0].type=[history]"])
def test_a_malformed_stage_is_reported_not_a_traceback(override: str) -> None:
    result = cli("validate", TINY, "--set", override)
    no_traceback(result)
    assert result.exit_code == 2


@pytest.mark.parametrize("override", ["cluster.gpu_memory_gb=.inf", "cluster.gpu_memory_gb=1e308",
                                      "train.optimizer.lr=.inf", "algorithm.correction.cap=-.inf"])
def test_a_non_finite_or_huge_number_is_refused_not_a_traceback(override: str) -> None:
    """gpu_memory_gb .inf (or 1e308) made the KV-cache estimate NaN: a ValueError escaped."""
    result = cli("validate", SINGLE, "--set", override)
    no_traceback(result)
    assert result.exit_code == 2, result.output
    path = override.partition("=")[0]
    assert re.search(rf"error: {re.escape(path)}: must be (a finite number|at most 100000)",
                     result.stderr), result.stderr


# --------------------------------------------------------------------------- schema, version


def test_schema_is_a_json_schema_of_the_spec() -> None:
    result = cli("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object"
    assert {"model", "train", "rollout", "filters", "reward", "cluster"} <= set(
        schema["properties"])
    assert {"name", "model", "train", "rollout"} <= set(schema["required"])
    assert "$defs" in schema


def test_version_through_the_console_script() -> None:
    script = Path(sys.executable).parent / "rlspec"
    if not script.exists():
        pytest.skip("rlspec console script not installed in this environment")
    result = subprocess.run([str(script), "version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == __version__
    assert cli("version").stdout.strip() == __version__


def test_cli_needs_no_heavy_imports(tmp_path: Path) -> None:
    code = f"""
import sys
from typer.testing import CliRunner
import compiler.cli
r = CliRunner()
for args in (["validate", {str(BIG)!r}], ["inspect", {str(BIG)!r}],
             ["compile", {str(TINY)!r}, "-o", {str(tmp_path / "b")!r}]):
    result = r.invoke(compiler.cli.app, args)
    assert result.exit_code == 0, result.output
print(sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "b" / "manifest.json").is_file()


@pytest.mark.parametrize("state", ["TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"])
def test_status_names_a_job_that_slurm_ended_abnormally(state: str) -> None:
    from rich.console import Console

    from compiler.inspect import show_status
    from compiler.submit import Submission

    record = Submission(backend="slurm", jobs={
        "sft": {"id": "7", "state": "COMPLETED", "log": "logs/7.out"},
        "rl": {"id": "8", "state": state, "log": "logs/8.out"},
        "export": {"id": "9", "state": "CANCELLED", "log": "logs/9.out"}})
    console = Console(record=True, width=200)
    show_status(console, record)
    text = console.export_text()
    assert f"rl failed ({state}); log: logs/8.out" in text
    assert "sft failed" not in text and "export failed" not in text


# --------------------------------------------------------------------------- Slurm failures


# A login node whose Slurm cannot reach its controller: every command fails this way.
NO_CONTROLLER = 'echo "$(basename "$0"): fatal: Could not establish a configuration source" >&2; exit 1'


def _slurm_stubs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **bodies: str) -> Path:
    """Stand-ins for Slurm's commands first on PATH; each logs its arguments to calls.log."""
    log = tmp_path / "calls.log"
    stubs = {name: f'echo "$(basename "$0") $*" >> {log}\n{body}' for name, body in bodies.items()}
    bin_dir = write_stubs(tmp_path / "bin-slurm-stubs", stubs)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def _two_slurm_jobs(bundle: Path) -> None:
    (bundle / "submission.json").write_text(json.dumps({"backend": "slurm", "jobs": {
        "convert": {"id": "4242", "state": "SUBMITTED", "log": "logs/4242"},
        "screen": {"id": "4243", "state": "SUBMITTED", "log": "logs/4243"}}}))


def _states(bundle: Path) -> dict[str, str]:
    jobs = json.loads((bundle / "submission.json").read_text())["jobs"]
    return {name: job["state"] for name, job in jobs.items()}


def test_a_failed_scancel_is_reported_and_nothing_is_recorded_cancelled(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log = _slurm_stubs(monkeypatch, tmp_path, squeue=NO_CONTROLLER, sacct=NO_CONTROLLER,
                       scancel=NO_CONTROLLER)
    _two_slurm_jobs(bundle_copy)
    result = cli("cancel", bundle_copy)
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert "cancelled" not in result.stdout
    assert len(error_lines(result.stderr)) == 1
    assert "Could not establish a configuration source" in result.stderr
    assert "not cancelled: convert (Slurm job 4242), screen (Slurm job 4243)" in result.stderr
    assert _states(bundle_copy) == {"convert": "SUBMITTED", "screen": "SUBMITTED"}
    assert "scancel 4242 4243" in log.read_text()


def test_cancel_records_the_jobs_scancel_cancelled(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """squeue shows convert running, sacct says screen already completed: only convert is
    cancelled."""
    log = _slurm_stubs(monkeypatch, tmp_path, squeue="echo '4242 RUNNING'",
                       sacct="echo '4243|COMPLETED'", scancel="exit 0")
    _two_slurm_jobs(bundle_copy)
    result = cli("cancel", bundle_copy)
    assert result.exit_code == 0, result.output
    assert "cancelled 1 job(s): 4242" in result.stdout
    assert _states(bundle_copy) == {"convert": "CANCELLED", "screen": "COMPLETED"}
    assert "scancel 4242\n" in log.read_text()


def test_status_warns_when_slurm_cannot_be_asked(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _slurm_stubs(monkeypatch, tmp_path, squeue=NO_CONTROLLER, sacct=NO_CONTROLLER)
    _two_slurm_jobs(bundle_copy)
    result = cli("status", bundle_copy)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "`squeue` failed (exit 1)" in warnings[0] and "`sacct` failed" in warnings[0]
    assert "last recorded state" in warnings[0]
    assert status_rows(result.stdout)["convert"][2] == "SUBMITTED"


def test_status_of_jobs_that_left_the_queue_needs_no_warning(
        bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """squeue -j of ended jobs says "Invalid job id" (exit 1): sacct answers for them."""
    _slurm_stubs(monkeypatch, tmp_path,
                 squeue="echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
                 sacct="printf '4242|COMPLETED\\n4243|CANCELLED by 0\\n'")
    _two_slurm_jobs(bundle_copy)
    result = cli("status", bundle_copy)
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    rows = status_rows(result.stdout)
    assert (rows["convert"][2], rows["screen"][2]) == ("COMPLETED", "CANCELLED")


# --------------------------------------------------------------------------- bad input: exit 2


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    return compile_to(TINY, tmp_path / "tiny")


@pytest.mark.parametrize("command", ["status", "submit", "cancel", "check", "report", "inspect"])
def test_a_path_that_does_not_exist_says_so(command: str, tmp_path: Path) -> None:
    result = cli(command, tmp_path / "nope")
    no_traceback(result)
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.stderr or "file not found" in result.stderr, result.stderr
    assert "has not been submitted" not in result.stderr


@pytest.mark.parametrize("content", ["{}", "[]", "null", '{"order": ["x"], "jobs": {}}'])
@pytest.mark.parametrize("args", [("inspect",), ("submit", "--dry-run"), ("submit",),
                                  ("status",), ("cancel",), ("check",)])
def test_a_manifest_of_the_wrong_shape_is_named(tiny_bundle: Path, content: str,
                                                args: tuple[str, ...]) -> None:
    (tiny_bundle / "manifest.json").write_text(content)
    result = cli(args[0], tiny_bundle, *args[1:])
    no_traceback(result)
    assert result.exit_code == 2, result.output
    assert "is not a valid rlspec manifest" in result.stderr and "recompile" in result.stderr
    assert not (tiny_bundle / "submission.json").exists()


@pytest.mark.parametrize("record", [{"backend": "slurm", "jobs": [1, 2]}, [],
                                    {"backend": "slurm", "jobs": {"convert": 7}}])
@pytest.mark.parametrize("command", ["status", "cancel"])
def test_a_submission_record_of_the_wrong_shape_is_named(bundle_copy: Path, record: object,
                                                         command: str) -> None:
    (bundle_copy / "submission.json").write_text(json.dumps(record))
    result = cli(command, bundle_copy)
    no_traceback(result)
    assert result.exit_code == 2, result.output
    assert "is not a valid submission record" in result.stderr


def test_run_of_a_slurm_spec_is_bad_input(tmp_path: Path) -> None:
    result = cli("run", SINGLE, "--out", tmp_path / "run", env={"RLSPEC_PYTHON": sys.executable})
    no_traceback(result)
    assert result.exit_code == 2 and "rlspec submit" in result.stderr, result.output


def test_compile_into_the_current_bundle_with_force(tiny_bundle: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`cd bundle && rlspec compile ../spec.yaml -o . --force` (Path('.') has no name)."""
    monkeypatch.chdir(tiny_bundle)
    result = cli("compile", SINGLE, "-o", ".", "--force")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["name"] == "qwen3-30b-a3b-espo"
    assert sorted(p.name for p in tiny_bundle.parent.iterdir()) == ["tiny"]


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


@pytest.mark.parametrize(("target", "read_only", "words"), [
    ("", False, "the output directory is empty"),
    ("afile/sub", False, "afile is a file, not a directory"),
    ("/proc/rlspec-bundle", False, "no directory can be created in /proc"),
    ("bundle", True, "is not writable (Read-only file system)"),
])
def test_compile_output_path_problems_are_one_clear_line(
        target: str, read_only: bool, words: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory\n")
    if read_only:  # tests run as root too, where a chmod does not stop a write
        _read_only(monkeypatch)
    result = cli("compile", TINY, "-o", target)
    no_traceback(result)
    assert result.exit_code == 2, result.output
    assert len(error_lines(result.stderr)) == 1 and words in result.stderr, result.stderr
    assert "Errno" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_compile_refuses_an_empty_output_through_the_console_script(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "compiler.main", "compile", str(TINY),
                             "-o", ""], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    assert "the output directory is empty" in result.stderr
    assert list(tmp_path.iterdir()) == []


needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is missing")


@needs_dot
def test_inspect_graph_png_writes_where_asked_and_never_clobbers(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = cli("inspect", tiny_bundle, "--graph", "png")
    assert first.exit_code == 0 and (tmp_path / "graph.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "graph.png").write_bytes(b"mine")
    again = cli("inspect", tiny_bundle, "--graph", "png")
    assert again.exit_code == 2 and "--force" in again.stderr
    assert (tmp_path / "graph.png").read_bytes() == b"mine"
    forced = cli("inspect", tiny_bundle, "--graph", "png", "--force")
    assert forced.exit_code == 0 and (tmp_path / "graph.png").read_bytes()[:4] == b"\x89PNG"
    elsewhere = cli("inspect", tiny_bundle, "--graph", "png", "-o", tmp_path / "g" / "x.png")
    no_traceback(elsewhere)  # dot could not open the file: CalledProcessError before
    assert elsewhere.exit_code == 2 and "cannot write" in elsewhere.stderr
    (tmp_path / "g").mkdir()
    written = cli("inspect", tiny_bundle, "--graph", "png", "-o", tmp_path / "g" / "x.png")
    assert written.exit_code == 0 and (tmp_path / "g" / "x.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "graph.png", "tiny"]
    alone = cli("inspect", tiny_bundle, "-o", tmp_path / "y.png")
    assert alone.exit_code == 2 and "--graph png" in alone.stderr

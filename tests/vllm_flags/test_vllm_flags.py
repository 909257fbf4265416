"""Every flag a rendered bundle passes to `vllm serve` exists in the pinned vLLM, with a value
its parser accepts.

The table (`vllm_serve_options.json`) is written by `tools/vllm_serve_options.py` from the
real parser of the pinned vLLM (`make vllm-table`). Each bundle with `rollout.engine: vllm`
(the examples and the public recipes) runs its RL launch script against stand-in `srun`,
`scontrol`, `torchrun` and `vllm`; the stand-in `vllm` records its exact argv, which is then
parsed the way argparse does: a renamed or removed flag, a value outside the choices or an
unparsable number fails here instead of in the cluster job.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from compiler.api import compile_spec
from compiler.bundle import write_bundle
from tests.helpers import SLURM_STUBS, write_stubs

pytestmark = pytest.mark.vllm_flags

ROOT = Path(__file__).resolve().parents[2]
TABLE = json.loads((Path(__file__).with_name("vllm_serve_options.json")).read_text())
# The pinned version is the Makefile's (`make vllm-table` installs it).
PINNED = next(line.split(":=")[1].strip() for line in (ROOT / "Makefile").read_text().splitlines()
              if line.startswith("VLLM_VERSION :="))
SPECS = [ROOT / "examples" / "single-node.yaml", ROOT / "examples" / "compassmax-245b.yaml",
         *sorted((ROOT / "tests" / "compiler" / "recipes").glob("*.yaml"))]

STUBS = {
    **SLURM_STUBS,
    "torchrun": "sleep 2",
    # argv exactly, one NUL-terminated argument after another, one file per call.
    "vllm": 'printf "%s\\0" "$@" > "$RECORD/vllm.$SLURMD_NODENAME.$$"; sleep 2',
    "python": "sleep 1",
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
    return problems


def rendered_vllm_calls(spec: Path, tmp_path: Path) -> list[list[str]]:
    """Run the bundle's RL launch script with stand-ins; every argv given to `vllm`."""
    compiled = compile_spec(spec)
    manifest = json.loads(compiled.files["manifest.json"])
    out = write_bundle(compiled.files, tmp_path / "bundle")
    bin_dir, record = write_stubs(tmp_path / "bin", STUBS), tmp_path / "record"
    record.mkdir()
    nodes = manifest["jobs"]["rl"]["resources"]["nodes"]
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "RLSPEC_TEST_NODES": str(nodes), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": f"node-[0-{nodes - 1}]", "RLSPEC_RUN_DIR": str(tmp_path / "run"),
           "RLSPEC_PYTHON": "python"}
    env.update({name: "x" for name in manifest.get("env_passthrough", [])})
    for line in compiled.files["env.sh"].splitlines():  # secrets the env script requires
        if "must be set" in line and "${" in line:
            env[line.split("${", 1)[1].split(":", 1)[0]] = "x"
    result = subprocess.run(["bash", "jobs/rl/launch.sh"], cwd=out, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [p.read_bytes().split(b"\0")[:-1] for p in sorted(record.glob("vllm.*"))]
    return [[a.decode() for a in call] for call in calls]


def test_the_table_is_the_pinned_vllms() -> None:
    assert TABLE["vllm_version"] == PINNED
    assert TABLE["command"] == "vllm serve"
    # Flags the runtime relies on (DESIGN.md §5).
    for flag in ("--enable-return-routed-experts", "--weight-transfer-config", "--headless",
                 "--data-parallel-rpc-port", "--served-model-name"):
        assert flag in TABLE["options"], flag


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_every_rendered_vllm_flag_is_accepted(spec: Path, tmp_path: Path) -> None:
    calls = rendered_vllm_calls(spec, tmp_path)
    assert calls, "the RL job started no vLLM engine"
    for argv in calls:
        assert check_argv(argv) == [], " ".join(argv)


@pytest.mark.parametrize(("argv", "problem"), [
    (["serve", "m", "--enable-return-routed-expert"], "has no option --enable-return-routed-expert"),
    (["serve", "m", "--dtype", "bf16"], "--dtype 'bf16' is not one of"),
    (["serve", "m", "--quantization", "fp9"], "--quantization 'fp9' is not one of"),
    (["serve", "m", "--port", "$((8000 + i))"], "is not an int"),
    (["serve", "m", "--tensor-parallel-size"], "needs a value"),
    (["serve", "m", "--headless=1"], "takes no value"),
])
def test_the_check_rejects_what_vllm_would(argv: list[str], problem: str) -> None:
    assert any(problem in p for p in check_argv(argv)), check_argv(argv)

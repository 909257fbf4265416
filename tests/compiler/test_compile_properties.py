"""Property tests through the whole compiler: spec file (+ `--set`) → compile_spec → files.

Any edit of an example spec either compiles into a consistent bundle or fails as a SpecError
whose problems are all located (a path, a line, or the `--set` that caused them). Nothing
else may escape: a GraphError, ZeroDivisionError, KeyError or jinja2 error is a compiler bug
that a user would see as a traceback. And every parallel layout that satisfies the rules of
DESIGN.md §3 compiles.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from compiler.api import Compiled, compile_spec
from compiler.render import file_hash
from spec.errors import Problem, SpecError
from spec.loader import OVERRIDE_FILE, load_data, read_text
from tests.spec.test_properties import KEYS, TEXT, VALUES, edited_specs, paths

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {
    "tiny": ROOT / "examples" / "tiny" / "spec.yaml",
    "qwen3-30b-a3b": ROOT / "examples" / "qwen3-30b-a3b.yaml",
    "compassmax-245b": ROOT / "examples" / "compassmax-245b.yaml",
}
# The examples as plain data, read under the spec's own YAML rules.
BASES: dict[str, dict[str, Any]] = {
    name: load_data(read_text(path), str(path))[0] for name, path in EXAMPLES.items()
}

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# Integers that size the run: the parallel layout, batch sizes, node counts, model shape.
SIZES = [
    "train.nodes", "rollout.nodes", "cluster.gpus_per_node",
    "train.parallelism.tensor", "train.parallelism.pipeline", "train.parallelism.context",
    "train.parallelism.expert", "train.parallelism.expert_tensor",
    "train.parallelism.virtual_pipeline", "train.parallelism.first_pipeline_stage_layers",
    "train.parallelism.last_pipeline_stage_layers",
    "train.micro_batch_size", "train.global_batch_size", "train.steps",
    "rollout.parallelism.tensor", "rollout.parallelism.data", "rollout.n",
    "rollout.prompts_per_step", "rollout.max_tokens", "data.max_prompt_tokens",
    "model.architecture.num_layers", "model.architecture.num_attention_heads",
    "model.architecture.num_query_groups", "model.architecture.hidden_size",
    "model.architecture.max_position_embeddings",
    "model.architecture.moe.num_experts", "model.architecture.moe.top_k",
    "model.architecture.moe.expert_ffn_hidden_size", "model.architecture.moe.first_dense_layers",
    "filters[0].nodes", "filters[0].samples_per_prompt", "filters[0].reuse_epochs",
    "filters[1].max_n", "eval.max_tokens", "eval.every_steps", "sft.steps",
]
SMALL_INTS = st.integers(-2, 16) | st.sampled_from([0, 1, 64, 128, 1024])


def _set(data: dict[str, Any], dotted_path: str, value: Any) -> None:
    """Set `a.b[0].c` in nested data, creating mappings on the way (like `--set`)."""
    parts = [int(p) if p.isdigit() else p
             for p in dotted_path.replace("[", ".").replace("]", "").split(".")]
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                return  # the example has no such item: nothing to edit
            node = node[part]
            continue
        if not isinstance(node, dict):
            return
        if not isinstance(node.get(part), dict | list):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, dict) or (isinstance(node, list) and isinstance(last, int)
                                  and last < len(node)):
        node[last] = value


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _bash_n(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)


class _Budget:
    """How many compiled bundles still get their scripts through `bash -n` (a few: cheap)."""

    def __init__(self, n: int):
        self.left = n

    def take(self) -> bool:
        self.left -= 1
        return self.left >= 0


def check_bundle(compiled: Compiled, bash: _Budget | None = None) -> None:
    files = compiled.files
    manifest = json.loads(files["manifest.json"])
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    for rel, digest in manifest["files"].items():
        assert file_hash(files[rel]) == digest, rel
    assert manifest["order"] == compiled.graph.order()
    for name in manifest["order"]:
        for leaf in ("launch.sh", "sbatch.sh", "config.json"):
            assert f"jobs/{name}/{leaf}" in files
        json.loads(files[f"jobs/{name}/config.json"])
        assert set(manifest["jobs"][name]["depends_on"]) <= set(manifest["order"])
    for rel in ("spec.yaml", "spec.resolved.yaml", "graph.json", "graph.dot", "env.sh",
                "lib.sh", "submit.sh"):
        assert rel in files
    if bash is not None and bash.take():
        for rel, text in sorted(files.items()):
            if rel.endswith(".sh"):
                result = _bash_n(text)
                assert result.returncode == 0, f"{rel}: {result.stderr}"


# A hint that names no value: "set x: " or "set x: , or ...".
EMPTY_HINT = re.compile(r":\s*(,|$)")


def check_problems(err: SpecError, *, overrides: bool = False) -> None:
    assert err.problems
    assert err.format().startswith(f"{len(err.problems)} problem")
    for p in err.problems:
        assert isinstance(p, Problem)
        assert p.severity == "error"
        assert p.message and p.format()
        located = p.path or p.line is not None or (overrides and p.file == OVERRIDE_FILE)
        assert located, p.format()
        if p.suggestion:
            assert not EMPTY_HINT.search(p.suggestion), p.format()


def compile_or_problems(path: Path, overrides: list[str] = (), bash: _Budget | None = None) -> None:
    """The property: a consistent bundle, or located problems; nothing else escapes."""
    try:
        compiled = compile_spec(path, list(overrides))
    except Exception as exc:
        if not isinstance(exc, SpecError):
            raise
        err = exc
        check_problems(err, overrides=bool(overrides))
    else:
        check_bundle(compiled, bash)


# --------------------------------------------------------------------------- random edits


_BASH: dict[str, _Budget] = {}


@st.composite
def size_edits(draw, base: dict[str, Any]) -> dict[str, Any]:
    """`edited_specs`'s edits, then 0-3 sizing integers set to small ints (0 and negatives too)."""
    data = draw(edited_specs(base)) if draw(st.booleans()) else copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 3))):
        _set(data, draw(st.sampled_from(SIZES)), draw(SMALL_INTS))
    return data


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@SETTINGS
@given(data=st.data())
def test_random_edits_compile_or_give_located_problems(name: str, data, tmp_path: Path) -> None:
    edited = data.draw(size_edits(BASES[name]))
    bash = _BASH.setdefault(name, _Budget(3))
    compile_or_problems(_write(tmp_path, edited), bash=bash)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@SETTINGS
@given(data=st.data())
def test_random_sizes_compile_or_give_located_problems(name: str, data) -> None:
    """Only the sizing integers change (more of them compile than with structural edits)."""
    edits = data.draw(st.lists(st.tuples(st.sampled_from(SIZES), SMALL_INTS), min_size=1,
                               max_size=4))
    overrides = [f"{path}={value}" for path, value in edits]
    compile_or_problems(EXAMPLES[name], overrides)


@st.composite
def overrides(draw, base: dict[str, Any]) -> list[str]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            path = draw(st.sampled_from(SIZES))
        elif kind == 1:
            keys = [p for p in paths(base) if all(isinstance(k, str | int) for k in p)]
            path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}"
                           for k in draw(st.sampled_from(keys))).lstrip(".")
        else:
            path = draw(TEXT | KEYS.map(str))
        value = yaml.safe_dump(draw(VALUES), default_flow_style=True, width=10**6)
        value = value.removesuffix("\n").removesuffix("\n...")
        out.append(f"{path}={value}" if draw(st.integers(0, 9)) else path)
    return out


@SETTINGS
@given(data=st.data())
def test_random_overrides_compile_or_give_located_problems(data) -> None:
    name = data.draw(st.sampled_from(sorted(EXAMPLES)))
    compile_or_problems(EXAMPLES[name], data.draw(overrides(BASES[name])))


# --------------------------------------------------------------------------- valid layouts


def _divisors(n: int, most: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (most is None or d <= most)]


@st.composite
def valid_layouts(draw) -> tuple[str, list[str], dict[str, int]]:
    """A GPU example and `--set` overrides of a layout that satisfies every grid rule:
    TP | heads and KV groups, PP | layers, EP | experts, ETP | expert FFN width,
    2·CP | sequence length, W = nodes·GPUs a multiple of TP·PP·CP and of ETP·EP·PP,
    global batch a multiple of micro batch · DP, rollouts per step a multiple of it, and with
    virtual pipeline at least PP micro-batches per step."""
    name = draw(st.sampled_from(["qwen3-30b-a3b", "compassmax-245b"]))
    base = BASES[name]
    arch = base["model"]["architecture"]
    moe = arch["moe"]
    gpn = base["cluster"]["gpus_per_node"]
    seq = base["data"]["max_prompt_tokens"] + base["rollout"]["max_tokens"]

    tp = draw(st.sampled_from(_divisors(math.gcd(arch["num_attention_heads"],
                                                 arch["num_query_groups"]), 8)))
    pp = draw(st.sampled_from(_divisors(arch["num_layers"], 8)))
    cp = draw(st.sampled_from([c for c in _divisors(seq, 8) if seq % (2 * c) == 0]))
    ep = draw(st.sampled_from(_divisors(moe["num_experts"], 16)))
    etp_set = draw(st.sampled_from([None, *_divisors(moe["expert_ffn_hidden_size"], 8)]))
    if etp_set is None and moe["expert_ffn_hidden_size"] % tp:
        etp_set = 1
    etp = tp if etp_set is None else etp_set
    vpp = None
    if pp > 1 and draw(st.booleans()):
        vpp = draw(st.sampled_from([v for v in _divisors(arch["num_layers"] // pp, 4) if v > 1]
                                   or [None]))
    grid = math.lcm(tp * pp * cp, etp * ep * pp)
    nodes = math.lcm(grid, gpn) // gpn * draw(st.integers(1, 3))
    dp = nodes * gpn // (tp * pp * cp)
    mbs = draw(st.sampled_from([1, 2]))
    gbs = mbs * dp * draw(st.integers(pp, pp + 3) if vpp else st.integers(1, 4))
    n = base["rollout"]["n"]
    prompts = gbs * draw(st.integers(1, 2))  # rollouts = prompts·n: a multiple of gbs
    sets = {
        "train.nodes": nodes, "train.parallelism.tensor": tp, "train.parallelism.pipeline": pp,
        "train.parallelism.context": cp, "train.parallelism.expert": ep,
        "train.micro_batch_size": mbs, "train.global_batch_size": gbs,
        "rollout.prompts_per_step": prompts,
    }
    out = [f"{k}={v}" for k, v in sets.items()]
    out += [f"train.parallelism.expert_tensor={'null' if etp_set is None else etp_set}",
            f"train.parallelism.sequence_parallel={'true' if tp > 1 else 'false'}",
            f"train.parallelism.virtual_pipeline={'null' if vpp is None else vpp}",
            # Memory is not a layout rule: give the GPUs room so that only the grid is judged.
            "cluster.gpu_memory_gb=100000"]
    info = {**sets, "etp": etp, "dp": dp, "n": n, "vpp": vpp or 0}
    return name, out, info


@SETTINGS
@given(layout=valid_layouts())
def test_valid_parallel_layouts_compile(layout) -> None:
    name, overrides_, info = layout
    compiled = compile_spec(EXAMPLES[name], overrides_, preflight=False)  # the compiler's grid
    check_bundle(compiled)
    plan = compiled.validated.plan
    assert plan.data_parallel == info["dp"]
    assert plan.expert_tensor_parallel == info["etp"]
    assert plan.expert_data_parallel == plan.train_world_size // (
        info["etp"] * info["train.parallelism.expert"] * info["train.parallelism.pipeline"])
    manifest = json.loads(compiled.files["manifest.json"])
    spec = compiled.validated.source.spec
    assert manifest["jobs"]["rl"]["resources"]["nodes"] == info["train.nodes"] + spec.rollout.nodes


# --------------------------------------------------------------------------- shell safety


SLURM_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=50, deadline=None)
@example(key="partition", value="gpu\ntouch /tmp/rlspec-injected")
@given(key=st.sampled_from(["partition", "account", "qos"]), value=SLURM_TEXT)
def test_slurm_settings_never_add_lines_to_sbatch_scripts(key: str, value: str) -> None:
    quoted = json.dumps(value)
    try:
        compiled = compile_spec(EXAMPLES["qwen3-30b-a3b"], [f"cluster.{key}={quoted}"])
    except SpecError as err:
        check_problems(err, overrides=True)
        return
    plain = compile_spec(EXAMPLES["qwen3-30b-a3b"]).files["jobs/rl/sbatch.sh"]
    script = compiled.files["jobs/rl/sbatch.sh"]
    def commands(text: str) -> list[str]:  # bash ends a line at \n only
        return [line for line in text.split("\n") if line and not line.startswith("#")]

    assert commands(script) == commands(plain)


@settings(max_examples=50, deadline=None)
@example(name="FOO\n")
@given(name=st.text(st.sampled_from("AB_1\n -="), min_size=1, max_size=5))
def test_env_names_are_shell_names(name: str) -> None:
    env = json.dumps({name: "1"})
    try:
        compiled = compile_spec(EXAMPLES["qwen3-30b-a3b"], [f"cluster.env={env}"])
    except SpecError as err:
        check_problems(err, overrides=True)
        return
    lines = compiled.files["env.sh"].split("\n")
    assert f"export {name}='1'" in lines or f"export {name}=1" in lines


# --------------------------------------------------------------------------- known crashes


@pytest.mark.parametrize("item", ["[]", "[history]", "[type, history]"])
def test_a_stage_written_as_a_list_is_a_problem(item: str) -> None:
    with pytest.raises(SpecError) as err:
        compile_spec(EXAMPLES["tiny"], [f"filters[0]={item}"])
    check_problems(err.value, overrides=True)


@pytest.mark.parametrize("value", ["[history]", "{a: 1}"])
def test_a_stage_type_that_is_not_a_scalar_is_a_problem(value: str) -> None:
    with pytest.raises(SpecError) as err:
        compile_spec(EXAMPLES["tiny"], [f"filters[0].type={value}"])
    check_problems(err.value, overrides=True)


@pytest.mark.parametrize("overrides_", [
    ["train.nodes=21"],  # micro 16 × DP 21 = 336 > 4·64 + 64
    ["rollout.n=1", "rollout.prompts_per_step=1", "train.global_batch_size=128", "filters=[]",
     "algorithm.advantage.estimator=group"],
], ids=["global_batch_size", "prompts_per_step"])
def test_every_hint_names_a_value(overrides_: list[str]) -> None:
    with pytest.raises(SpecError) as err:
        compile_spec(EXAMPLES["tiny"], overrides_)
    for p in err.value.problems:
        assert p.suggestion and not EMPTY_HINT.search(p.suggestion), p.format()

"""Public launch layouts that run in production must validate; so must our examples.

Each file in recipes/ reproduces a public recipe (source in its header comment): the
architecture from the model's HF config.json, the parallel layout from the public script.
A rule that rejects one of them is wrong (DESIGN.md §3), unless the layout uses a Megatron
option rlspec has no field for (NOT_EXPRESSIBLE, in the README's table). Warnings are allowed: slime's
large recipes offload the optimizer to the CPU, which our memory estimate reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler.checks import check
from compiler.plan import make_plan
from spec.loader import load_spec
from tests.compiler.conftest import EXAMPLES, RECIPES

RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
EXAMPLE_FILES = [EXAMPLES / "tiny" / "spec.yaml", EXAMPLES / "qwen3-30b-a3b.yaml",
                 EXAMPLES / "compassmax-245b.yaml"]
SOURCES = ("THUDM/slime", "Megatron-MoE-ModelZoo", "volcengine/verl", "NVIDIA-NeMo/RL")
# Published layouts that rlspec cannot express today, and why (the README's support table).
NOT_EXPRESSIBLE = {
    # ModelZoo splits 94 layers + embedding + loss as 96 over PP 8 × VPP 4 with
    # --account-for-embedding/loss-in-pipeline-split: 11 layers on the first and last stages,
    # which first/last_pipeline_stage_layers cannot spread over 4 virtual stages (megatron-core
    # asks the same divisibility of --decoder-first/last-pipeline-num-layers).
    "qwen3-235b-a22b-modelzoo": "train.parallelism.virtual_pipeline",
}


def _errors(path: Path) -> list[str]:
    src = load_spec(path)
    return [src.locate(p).format() for p in check(src.spec, make_plan(src.spec))
            if p.severity == "error"]


def test_the_recipes_cover_the_public_models() -> None:
    names = {p.stem for p in RECIPE_FILES}
    assert {"qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "glm-4.5",
            "moonlight-16b-a3b"} <= names
    families = {load_spec(p).spec.model.architecture.family for p in RECIPE_FILES}
    assert families == {"qwen3_moe", "deepseek_v3", "glm4_moe", "qwen3", "llama"}
    for source in SOURCES:
        assert any(source in p.read_text(encoding="utf-8") for p in RECIPE_FILES), source


def test_at_least_40_of_the_42_published_layouts_validate() -> None:
    assert len(RECIPE_FILES) == 42
    assert all(load_spec(p).spec.train.backend == "megatron" for p in RECIPE_FILES)
    valid = [p.stem for p in RECIPE_FILES if p.stem not in NOT_EXPRESSIBLE and _errors(p) == []]
    assert len(valid) == 41 >= 40


def test_the_layouts_rlspec_cannot_express_fail_where_expected() -> None:
    for stem, field in NOT_EXPRESSIBLE.items():
        errors = _errors(RECIPES / f"{stem}.yaml")
        assert len(errors) == 1 and f"error: {field}:" in errors[0], errors


VALID_FILES = [p for p in RECIPE_FILES if p.stem not in NOT_EXPRESSIBLE]


@pytest.mark.parametrize("path", VALID_FILES, ids=lambda p: p.stem)
def test_recipe_validates(path: Path) -> None:
    assert _errors(path) == []


# Recipes whose source colocates trainer and vLLM (NeMo-RL) and that fit colocated at the
# source's gpu_memory_utilization, next to the trainer's weights, gradients and optimizer state
# (rlspec's trainer does not offload them during generation, as NeMo-RL does).
COLOCATED = ("llama3.2-1b-nemorl", "moonlight-16b-a3b-nemorl", "qwen3-1.7b-nemorl",
             "qwen3-30b-a3b-nemorl-8n8g")


@pytest.mark.parametrize("stem", COLOCATED)
def test_colocated_recipes_share_the_trainers_nodes(stem: str) -> None:
    src = load_spec(RECIPES / f"{stem}.yaml")
    spec = src.spec
    assert spec.rollout.placement == "colocated"
    assert make_plan(spec).rl_nodes == spec.train.nodes == spec.rollout.nodes
    assert [p for p in check(spec, make_plan(spec)) if p.severity == "error"] == []
    # At a utilization that leaves too little for the trainer, the colocation check says so.
    high = load_spec(RECIPES / f"{stem}.yaml", ["rollout.gpu_memory_utilization=0.95"])
    errors = [p.path for p in check(high.spec, make_plan(high.spec)) if p.severity == "error"]
    assert errors == [("rollout", "gpu_memory_utilization")]


def test_the_eplb_recipe_needs_its_redundant_experts() -> None:
    # slime's 24-GPU engine: 128 experts do not split over EP 24, 128 + 16 do.
    src = load_spec(RECIPES / "qwen3-30b-a3b-eplb.yaml", ["rollout.redundant_experts=0"])
    errors = [p for p in check(src.spec, make_plan(src.spec)) if p.severity == "error"]
    assert [p.path for p in errors] == [("rollout", "parallelism", "expert_parallel")]
    assert errors[0].suggestion.startswith("set rollout.redundant_experts: 16")


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_recipe_names_its_source(path: Path) -> None:
    header = path.read_text(encoding="utf-8").split("\nname:")[0]
    assert any(s in header for s in SOURCES), "say where the layout comes from"
    assert "config.json" in header, "say where the architecture comes from"


@pytest.mark.parametrize("path", VALID_FILES, ids=lambda p: p.stem)
def test_recipe_memory_is_not_rejected(path: Path) -> None:
    # Over capacity only with the optimizer state is a warning (it can be offloaded), never
    # an error: the slime recipes run exactly that way.
    src = load_spec(path)
    plan = make_plan(src.spec)
    t = plan.train_memory
    assert t.total_gb - t.parts["optimizer"] <= t.capacity_gb
    assert plan.rollout_memory.total_gb <= plan.rollout_memory.capacity_gb
    assert plan.rollout_max_sequences >= 1


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_example_has_no_problems(path: Path) -> None:
    src = load_spec(path)
    assert [src.locate(p).format() for p in check(src.spec, make_plan(src.spec))] == []


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_example_explains_every_section(path: Path) -> None:
    """Tutorial examples: every top-level section is introduced by a comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line and not line[0].isspace() and not line.startswith("#") and line.endswith(":"):
            above = next(x for x in reversed(lines[:i]) if x.strip())
            assert above.lstrip().startswith("#"), f"{path.name}:{i + 1}: {line} has no comment"


# What the runtime refuses of each published recipe today (the README's support table): the
# compiler's checks accept every one of them, and `rlspec validate` refuses exactly these.
REFUSED = {
    "qwen3-30b-a3b": set(),
    "qwen3-30b-a3b-eplb": set(),
    "qwen3-235b-a22b": set(),
    "moonlight-16b-a3b": set(),
    "glm-4.5": set(),
    "deepseek-v3": set(),
    "deepseek-r1": set(),
    "kimi-k2-slime": set(),
    "kimi-k2-slime-thinking": set(),
    "qwen3-235b-a22b-slime-int4": set(),
    "deepseek-v3-nemorl": set(),
    "deepseek-v3-nemorl-32n4g": set(),
    "qwen3-30b-a3b-nemorl-cp2-r3": set(),
    "qwen3-30b-a3b-nemorl-cp2-r3-async": set(),
    "qwen3-30b-a3b-nemorl-cispo": set(),
    "deepseek-v3-verl": set(),
    "deepseek-v3-verl-96gb": set(),
    "llama3.1-8b-nemorl": set(),
    "llama3.1-8b-nemorl-2n8g-fp8": set(),
    "llama3.2-1b-nemorl": set(),
    "llama3.2-1b-nemorl-noncolocated": set(),
    "moonlight-16b-a3b-nemorl": set(),
    "moonlight-16b-a3b-nemorl-4n4g": set(),
    "moonlight-16b-a3b-slime-int4": set(),
    "moonlight-16b-a3b-verl": set(),
    "qwen3-1.7b-nemorl": set(),
    "qwen3-235b-a22b-verl": set(),
    "qwen3-30b-a3b-modelzoo": set(),
    "qwen3-30b-a3b-nemorl": set(),
    "qwen3-30b-a3b-nemorl-2n8g": set(),
    "qwen3-30b-a3b-nemorl-32k": set(),
    "qwen3-30b-a3b-nemorl-8n4g": set(),
    "qwen3-30b-a3b-nemorl-8n8g": set(),
    "qwen3-30b-a3b-slime-fp8": set(),
    "qwen3-30b-a3b-verl": set(),
    "qwen3-30b-a3b-verl-gspo": set(),
    "qwen3-30b-a3b-verl-router-replay": set(),
    "qwen3-32b-slime": set(),
    "qwen3-4b-slime": set(),
    "qwen3-4b-slime-fp8": set(),
    "qwen3-8b-nemorl": set(),
}


@pytest.mark.parametrize("path", VALID_FILES, ids=lambda p: p.stem)
def test_recipe_refusals_are_the_support_table(path: Path) -> None:
    from compiler.api import compile_spec
    from spec.errors import dotted

    refused = {dotted(p.path) for p in compile_spec(path, preflight=False).refusals}
    assert refused == REFUSED[path.stem]

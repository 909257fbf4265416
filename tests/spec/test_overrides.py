"""`--set path=value`: parsed like the file, validated like the file, shown as "--set"."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from spec.errors import SpecError
from spec.loader import load_spec
from spec.overrides import apply_overrides, parse_path

DATA = Path(__file__).parent / "data"
VALID = DATA / "valid.yaml"


def set_problems(*overrides: str, path: Path = VALID) -> list:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return info.value.problems


def test_parse_path() -> None:
    assert parse_path("train.parallelism.tensor") == ["train", "parallelism", "tensor"]
    assert parse_path("filters[1].action") == ["filters", 1, "action"]
    assert parse_path("filters.1.action") == ["filters", "1", "action"]
    assert parse_path("a[0][2]") == ["a", 0, 2]
    for bad in ("", "train..steps", ".train", "train.", "a[x]", "a[1", "a b"):
        assert parse_path(bad) is None, bad


def test_set_nested_values_with_the_file_rules() -> None:
    spec = load_spec(VALID, ["train.optimizer.lr=3e-4", "train.parallelism.tensor=2",
                             "router_replay.mode=r3", "rollout.sampling.top_p=0.9",
                             "cluster.env.HF_HOME=/scratch/hf", "name=tiny-2"]).spec
    assert spec.train.optimizer.lr == 3e-4
    assert spec.train.parallelism.tensor == 2  # `parallelism` was created
    assert spec.router_replay.mode == "r3"
    assert spec.rollout.sampling.top_p == 0.9
    assert spec.cluster.env == {"HF_HOME": "/scratch/hf"}
    assert spec.name == "tiny-2"


def test_off_stays_a_string() -> None:
    spec = load_spec(VALID, ["router_replay.mode=r2", "router_replay.mode=off"]).spec
    assert spec.router_replay.mode == "off"


def test_set_list_items_both_spellings() -> None:
    src = load_spec(VALID, ["filters[0].action=keep", "filters.1.window=5"])
    assert src.spec.filters[0].action == "keep"
    assert src.spec.filters[1].window == 5
    assert src.overridden[("filters", 1, "window")] == "filters.1.window=5"


def test_append_and_negative_index() -> None:
    spec = load_spec(VALID, ["filters[-1].cooldown_steps=7",
                             "reward.verifiers[1]={type: math, weight: 0.5}"]).spec
    assert spec.filters[1].cooldown_steps == 7
    assert [v.type for v in spec.reward.verifiers] == ["arithmetic", "math"]


def test_missing_list_is_created() -> None:
    for override in ("filters[0]={type: history}", "filters.0.type=history"):
        spec = load_spec(VALID, ["filters=null", override]).spec
        assert [s.type for s in spec.filters] == ["history"]


def test_failed_override_changes_nothing(spec_dict) -> None:
    data, problems = apply_overrides(spec_dict, ["sft.steps.x[3]=1", "train.steps.x=1"])
    assert len(problems) == 2
    assert data == spec_dict


def test_whole_sections_and_lists() -> None:
    spec = load_spec(VALID, ["filters=[]", "sft={steps: 5}", "export=null"]).spec
    assert spec.filters == [] and spec.sft.steps == 5 and spec.export is None


def test_apply_overrides_does_not_touch_its_input(spec_dict) -> None:
    before = copy.deepcopy(spec_dict)
    data, problems = apply_overrides(spec_dict, ["train.steps=3", "sft.steps=2"])
    assert problems == []
    assert spec_dict == before
    assert data["train"]["steps"] == 3 and data["sft"] == {"steps": 2}


def test_bad_value_gives_the_same_error_as_in_the_file(problems_of) -> None:
    in_file = problems_of(VALID.read_text().replace("steps: 10", "steps: '8'"))
    (by_set,) = set_problems("train.steps='8'")
    (file_problem,) = in_file
    assert by_set.path == file_problem.path == ("train", "steps")
    assert by_set.file == "--set" and by_set.line is None
    assert by_set.message == f"{file_problem.message} (from --set train.steps='8')"
    assert by_set.suggestion == file_problem.suggestion == "remove the quotes: 8"
    assert by_set.format() == (
        "--set: error: train.steps: expected an integer, got the string '8' "
        "(from --set train.steps='8')\n    hint: remove the quotes: 8")


def test_unknown_key_by_override() -> None:
    (p,) = set_problems("train.paralelism.tensor=2")
    assert (p.path, p.file, p.line) == (("train", "paralelism"), "--set", None)
    assert p.message == "unknown key 'paralelism' (from --set train.paralelism.tensor=2)"
    assert p.suggestion == "did you mean 'parallelism'?"


def test_wrong_literal_by_override() -> None:
    (p,) = set_problems("filters[0].action=dropp")
    assert (p.path, p.file) == (("filters", 0, "action"), "--set")
    assert p.suggestion == "did you mean 'drop'? allowed: rl_zvp, drop, keep"


def test_replaced_section_is_not_located_in_the_file() -> None:
    (p,) = set_problems("train.optimizer={lr: -1}")
    assert (p.path, p.file, p.line) == (("train", "optimizer", "lr"), "--set", None)


def test_validator_above_an_override_keeps_the_file_line() -> None:
    (p,) = set_problems("model.architecture.moe.top_k=9")
    assert (p.path, p.line) == (("model", "architecture", "moe"), 12)
    assert p.file == str(VALID)
    assert p.message.endswith("(after --set model.architecture.moe.top_k=9)")


@pytest.mark.parametrize(
    ("override", "path", "message", "hint"),
    [
        ("train.steps", (), "malformed override 'train.steps': no '='",
         "write --set dotted.path=value, e.g. --set train.steps=100 or "
         "--set filters[0].action=drop"),
        ("train..steps=1", (), "malformed path 'train..steps' (in --set train..steps=1)", None),
        ("=1", (), "malformed path '' (in --set =1)", None),
        ("[0]=1", (), "the spec is a mapping, not a list (in --set [0]=1)", None),
        ("name.first=a", ("name",),
         "name is the string 'tiny', so it has no key 'first' (in --set name.first=a)",
         "set name itself, e.g. --set name=..."),
        ("filters.action=drop", ("filters", "action"),
         "filters is a list, not a mapping (in --set filters.action=drop)",
         "give an item index, e.g. filters[0].action"),
        ("filters[5].action=drop", ("filters",),
         "filters has 2 items, no index 5 (in --set filters[5].action=drop)",
         "indices start at 0; filters[2] appends an item"),
        ("train[0]=1", ("train",), "train is a mapping, not a list (in --set train[0]=1)",
         "name a key: train.<key>"),
        ("train.steps=[1", ("train", "steps"),
         "the value '[1' is not valid YAML: invalid YAML at column 3: expected ',' or ']', "
         "but got '<stream end>' (in --set train.steps=[1)",
         "quote a value that holds YAML punctuation, e.g. name='a: b'"),
    ],
)
def test_bad_overrides(override, path, message, hint) -> None:
    (p,) = set_problems(override)
    assert (p.path, p.file, p.line, p.message) == (path, "--set", None, message)
    if hint is not None:
        assert p.suggestion == hint


def test_override_and_file_problems_are_reported_together(problems_of) -> None:
    text = VALID.read_text().replace("loss", "loss").replace("steps: 10", "steps: 0")
    problems = problems_of(text, ("train.global_batch_size=x", "nope"))
    assert [(p.path, p.file == "--set") for p in problems] == [
        (("train", "steps"), False), ((), True), (("train", "global_batch_size"), True)]


def test_later_override_wins() -> None:
    (p,) = set_problems("train.parallelism.tensor=2", "train.parallelism={tensor: x}")
    assert p.message.endswith("(from --set train.parallelism={tensor: x})")


# --------------------------------------------------------------------------- secrets
# A refused secret is never echoed whole: not in the message, not in the "(from --set ...)"
# that quotes the override. What a later --set replaces is refused too: every --set is
# recorded in the bundle (manifest.json) and the file is copied into it (spec.yaml).

HF = "hf_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3h"


def shown(problems: list) -> str:
    return "\n".join(p.format() for p in problems)


@pytest.mark.parametrize(("override", "path", "secret"), [
    (f"cluster.env.HF_TOKEN={HF}", ("cluster", "env", "HF_TOKEN"), HF),
    ("cluster.env.DB_PASS=hunter2", ("cluster", "env", "DB_PASS"), "hunter2"),
    ("cluster.env.DB_PASS=12345678", ("cluster", "env", "DB_PASS"), "12345678"),
    ("cluster.env={GITHUB_PAT: hunter2}", ("cluster", "env", "GITHUB_PAT"), "hunter2"),
    (f"cluster.env.SETTING={HF}", ("cluster", "env", "SETTING"), HF),
    (f"model.checkpoint={HF}", ("model", "checkpoint"), HF),
    (f"train.steps={HF}", ("train", "steps"), HF),
    ("reward.judge={type: http, model: m, url: 'https://bob:hunter2pw@judge.example/v1'}",
     ("reward", "judge", "url"), "hunter2pw"),
    ("reward.judge.url=https://bob:hunter2pw@judge.example/v1", ("reward", "judge", "url"),
     "hunter2pw"),
    ("cluster.env.DB_PASS=[hunter2", ("cluster", "env", "DB_PASS"), "hunter2"),
])
def test_a_secret_set_by_override_is_refused_and_masked(override, path, secret) -> None:
    problems = set_problems(override)
    assert path in [p.path for p in problems]
    assert all(p.file == "--set" for p in problems)
    assert secret not in shown(problems)
    assert "***" in shown(problems)


def test_a_secret_in_the_file_is_masked_in_the_message_of_a_later_override(problems_of) -> None:
    text = VALID.read_text() + "cluster:\n  env:\n    SETTING: " + HF + "\n"
    problems = problems_of(text, ("cluster.env.HF_HOME=/scratch/hf",))
    assert [(p.path, p.line) for p in problems] == [(("cluster", "env", "SETTING"), 34)]
    assert HF[4:] not in shown(problems)


def test_a_replaced_secret_override_is_refused() -> None:
    """The spec that validates holds no secret, but manifest.json would keep the --set."""
    (p,) = set_problems("cluster.env.DB_PASS=hunter2", "cluster.env={}")
    assert (p.path, p.file) == ((), "--set")
    assert p.message == ("--set cluster.env.DB_PASS=hu*** holds a secret; a later --set "
                         "replaces it, but every --set is recorded in the bundle (manifest.json)")


def test_a_secret_of_the_file_replaced_by_an_override_is_refused(problems_of) -> None:
    text = VALID.read_text() + f"cluster:\n  env:\n    DB_PASS: hunter2\n    X: '{HF}'\n"
    problems = problems_of(text, ("cluster.env={}",))
    assert [(p.path, p.line) for p in problems] == [
        (("cluster", "env", "DB_PASS"), 34), (("cluster", "env", "X"), 35)]
    assert all("copied into the bundle (spec.yaml)" in p.message for p in problems)
    assert "hunter2" not in shown(problems) and HF[4:] not in shown(problems)


def test_common_variables_set_by_override_pass() -> None:
    spec = load_spec(VALID, ["cluster.env.TOKENIZERS_PARALLELISM='false'",
                             "cluster.env.WANDB_PROJECT=rl", "cluster.env.NCCL_DEBUG=INFO"]).spec
    assert spec.cluster.env["TOKENIZERS_PARALLELISM"] == "false"

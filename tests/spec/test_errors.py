"""pydantic's errors in a person's words: path, message, suggestion, line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spec.errors import SpecError
from spec.loader import load_spec

DATA = Path(__file__).parent / "data"


def one(problems_of, data) -> tuple:
    """(dotted path parts, message, suggestion) of the single problem of `data`."""
    problems = problems_of(data)
    assert len(problems) == 1, [p.format() for p in problems]
    p = problems[0]
    return p.path, p.message, p.suggestion


def test_three_mistakes_reported_together_with_lines() -> None:
    with pytest.raises(SpecError) as info:
        load_spec(DATA / "three_mistakes.yaml")
    problems = info.value.problems
    assert [(p.line, p.path) for p in problems] == [
        (14, ("train", "steps")), (15, ("train", "paralelism")), (26, ("algorithm", "loss"))]
    file = DATA / "three_mistakes.yaml"
    assert info.value.format() == "\n".join([
        "3 problems in the spec:",
        f"{file}:14: error: train.steps: expected an integer, got the string '10'",
        "    hint: remove the quotes: 10",
        f"{file}:15: error: train.paralelism: unknown key 'paralelism'",
        "    hint: did you mean 'parallelism'?",
        f"{file}:26: error: algorithm.loss: 'epso' is not an allowed value",
        "    hint: did you mean 'espo'? allowed: espo, gspo, grpo, cispo",
    ])


# --------------------------------------------------------------------------- unknown keys


def test_unknown_key_did_you_mean(problems_of, spec_dict) -> None:
    spec_dict["train"]["paralelism"] = {"tensor": 2}
    assert one(problems_of, spec_dict) == (
        ("train", "paralelism"), "unknown key 'paralelism'", "did you mean 'parallelism'?")


def test_unknown_top_level_key(problems_of, spec_dict) -> None:
    spec_dict["rolout"] = spec_dict.pop("rollout")
    problems = problems_of(spec_dict)
    assert [(p.path, p.message, p.suggestion) for p in problems] == [
        (("rolout",), "unknown key 'rolout': the required section 'rollout' is missing",
         "did you mean 'rollout'?"),
    ]
    assert problems[0].line is not None


def test_unknown_key_in_a_deep_section(problems_of, spec_dict) -> None:
    spec_dict["model"]["architecture"]["moe"]["num_expert"] = 8
    assert one(problems_of, spec_dict)[1:] == ("unknown key 'num_expert'",
                                               "did you mean 'num_experts'?")


def test_key_in_the_wrong_section(problems_of, spec_dict) -> None:
    spec_dict["train"]["lr"] = 1e-6
    assert one(problems_of, spec_dict)[2] == "'lr' belongs under train.optimizer"
    spec_dict["train"].pop("lr")
    spec_dict["rollout"]["temperature"] = 0.7
    assert one(problems_of, spec_dict)[2] == "'temperature' belongs under rollout.sampling"


def test_unknown_key_without_a_match_lists_the_keys(problems_of, spec_dict) -> None:
    spec_dict["router_replay"] = {"zzz": 1}
    assert one(problems_of, spec_dict) == (
        ("router_replay", "zzz"), "unknown key 'zzz'", "valid keys here: mode")


def test_unknown_key_inside_a_filter_stage(problems_of, spec_dict) -> None:
    spec_dict["filters"] = [{"type": "flat_groups", "action": "drop", "oversampel": 2.0}]
    assert one(problems_of, spec_dict) == (
        ("filters", 0, "oversampel"), "unknown key 'oversampel'", "did you mean 'oversample'?")


# --------------------------------------------------------------------------- literals, stages


def test_wrong_literal(problems_of, spec_dict) -> None:
    spec_dict["algorithm"] = {"loss": "epso"}
    assert one(problems_of, spec_dict) == (
        ("algorithm", "loss"), "'epso' is not an allowed value",
        "did you mean 'espo'? allowed: espo, gspo, grpo, cispo")


def test_wrong_literal_without_a_close_match(problems_of, spec_dict) -> None:
    spec_dict["algorithm"] = {"loss": "ppo"}
    assert one(problems_of, spec_dict)[2] == "allowed: espo, gspo, grpo, cispo"


def test_literal_of_the_wrong_type(problems_of, spec_dict) -> None:
    spec_dict["router_replay"] = {"mode": False}
    assert one(problems_of, spec_dict)[1] == "expected one of off, r2, r3, got the boolean false"


def test_literal_inside_a_stage_and_a_list(problems_of, spec_dict) -> None:
    spec_dict["filters"] = [{"type": "flat_groups", "action": "dropp"}]
    spec_dict["data"]["generator"]["operations"] = ["+", "/"]
    problems = problems_of(spec_dict)
    assert {p.path: p.suggestion for p in problems} == {
        ("data", "generator", "operations", 1): "allowed: +, -, *",
        ("filters", 0, "action"): "did you mean 'drop'? allowed: rl_zvp, drop, keep",
    }


def test_wrong_stage_type(problems_of, spec_dict) -> None:
    spec_dict["filters"] = [{"type": "flat_group", "action": "drop"}]
    assert one(problems_of, spec_dict) == (
        ("filters", 0, "type"), "unknown stage type 'flat_group'",
        "did you mean 'flat_groups'? stage types: offline_pass_rate, adaptive_group_size, "
        "reward_shaping, flat_groups, history")


def test_missing_stage_type_guesses_from_the_keys(problems_of, spec_dict) -> None:
    spec_dict["filters"] = [{"action": "drop", "oversample": 2.0}]
    path, message, hint = one(problems_of, spec_dict)
    assert (path, message) == (("filters", 0), "a stage needs a 'type' key")
    assert hint.startswith("add 'type: flat_groups'? stage types: offline_pass_rate")


def test_stage_written_as_a_string(problems_of, spec_dict) -> None:
    spec_dict["filters"] = ["history"]
    assert one(problems_of, spec_dict) == (
        ("filters", 0), "expected a stage (a mapping with a 'type' key), got the string 'history'",
        "write it as '- type: history'")


# --------------------------------------------------------------------------- missing, types


def test_missing_required_key_is_shown_at_its_section(problems_of) -> None:
    text = (DATA / "valid.yaml").read_text().replace("  global_batch_size: 64\n", "")
    (p,) = problems_of(text)
    assert p.path == ("train", "global_batch_size")
    assert p.line == 13  # the `train:` line
    assert p.message == "missing required key 'global_batch_size'"
    assert p.suggestion == "global_batch_size: Responses per optimizer step."


def test_a_misspelt_required_key_is_one_problem(problems_of) -> None:
    """Not "unknown key 'global_batchsize'" and "missing required key" for the same slip."""
    text = (DATA / "valid.yaml").read_text().replace("  global_batch_size: 64\n",
                                                     "  global_batchsize: 64\n")
    (p,) = problems_of(text)
    assert p.path == ("train", "global_batchsize")
    assert p.message == ("unknown key 'global_batchsize': the required key 'global_batch_size' "
                         "is missing")
    assert p.suggestion == "did you mean 'global_batch_size'?"


def test_missing_section(problems_of, spec_dict) -> None:
    del spec_dict["reward"]
    (p,) = problems_of(spec_dict)
    assert (p.path, p.message, p.line) == (("reward",), "missing required section 'reward'", None)


@pytest.mark.parametrize(
    ("section", "key", "value", "message", "hint"),
    [
        ("train", "steps", "8", "expected an integer, got the string '8'", "remove the quotes: 8"),
        ("train", "steps", 8.0, "expected an integer, got the number 8.0",
         "write it as an integer: 8"),
        ("train", "steps", True, "expected an integer, got the boolean true", None),
        ("train", "steps", [8], "expected an integer, got a list", None),
        ("train", "optimizer", 1, "expected a mapping (the optimizer section), got the integer 1",
         None),
        ("train", "optimizer", None, "expected a mapping (the optimizer section), got null "
         "(an empty value)", "remove the key to use the defaults, or give its keys"),
        ("model", "checkpoint", 5, "expected a string, got the integer 5", "quote it: '5'"),
        ("rollout", "fp8", "yes", "expected a boolean, got the string 'yes'",
         "write true: only true and false are booleans in a spec (not yes/no/on/off)"),
        ("rollout", "gpu_memory_utilization", "0.9", "expected a number, got the string '0.9'",
         "remove the quotes: 0.9"),
        ("cluster", "env_passthrough", "HF_TOKEN", "expected a list, got the string 'HF_TOKEN'",
         "write a list, e.g. [HF_TOKEN]"),
        ("cluster", "env", ["A=1"], "expected a mapping, got a list", None),
    ],
)
def test_wrong_types(problems_of, spec_dict, section, key, value, message, hint) -> None:
    spec_dict.setdefault(section, {})[key] = value
    assert one(problems_of, spec_dict) == ((section, key), message, hint)


def test_env_value_must_be_a_string(problems_of, spec_dict) -> None:
    spec_dict["cluster"] = {"env": {"OMP_NUM_THREADS": 8}}
    assert one(problems_of, spec_dict) == (
        ("cluster", "env", "OMP_NUM_THREADS"), "expected a string, got the integer 8",
        "quote it: '8'")


# --------------------------------------------------------------------------- ranges, validators


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("model", "architecture", "moe", "num_experts"), 0, "must be greater than 0, got 0"),
        (("train", "optimizer", "adam_beta1"), 1.0, "must be less than 1, got 1.0"),
        (("train", "optimizer", "weight_decay"), -0.1, "must be at least 0, got -0.1"),
        (("rollout", "sampling", "top_p"), 1.5, "must be at most 1, got 1.5"),
        (("reward", "verifiers"), [], "needs at least 1 item, got 0"),
    ],
)
def test_range_errors(problems_of, spec_dict, path, value, message) -> None:
    node = spec_dict
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    assert one(problems_of, spec_dict)[:2] == (path, message)


def test_pattern_error_explains_the_rule(problems_of, spec_dict) -> None:
    spec_dict["name"] = "My Run"
    assert one(problems_of, spec_dict) == (
        ("name",), "'My Run' does not match the pattern ^[a-z0-9][a-z0-9_-]{0,62}$",
        "Run name: lower-case letters, digits, '-' and '_' (a Slurm job-name prefix).")


def test_model_validator_message_at_its_section(problems_of) -> None:
    text = (DATA / "valid.yaml").read_text().replace("top_k: 2", "top_k: 9")
    (p,) = problems_of(text)
    assert (p.path, p.line) == (("model", "architecture", "moe"), 12)
    assert p.message == ("top_k (9) exceeds num_experts (8); a token cannot be routed to more "
                         "experts than exist")


def test_field_validator_message(problems_of, spec_dict) -> None:
    spec_dict["cluster"] = {"time_limit": "24h"}
    assert one(problems_of, spec_dict)[:2] == (
        ("cluster", "time_limit"),
        "time_limit '24h' is not [D-]HH:MM:SS, e.g. '2-00:00:00' or '04:00:00'")


def test_validator_inside_a_stage_drops_the_union_tag(problems_of, spec_dict) -> None:
    spec_dict["filters"] = [{"type": "offline_pass_rate", "min_pass_rate": 0.9,
                             "max_pass_rate": 0.5}]
    path, message, _ = one(problems_of, spec_dict)
    assert path == ("filters", 0)
    assert message.startswith("min_pass_rate (0.9) ≥ max_pass_rate (0.5)")


@pytest.mark.parametrize(("stages", "message"), [
    (["history", "offline_pass_rate"], "offline_pass_rate screens prompts before RL: list it first"),
    (["history", "history"], "stage 'history' is listed twice"),
    (["flat_groups", "reward_shaping"],
     "reward_shaping breaks ties, so it must come before flat_groups"),
])
def test_stage_order_rules(problems_of, spec_dict, stages, message) -> None:
    spec_dict["filters"] = [{"type": t} for t in stages]
    if "flat_groups" in stages:
        spec_dict["filters"][stages.index("flat_groups")]["action"] = "keep"
    assert one(problems_of, spec_dict)[:2] == (("filters",), message)


def test_problems_come_in_file_order(problems_of) -> None:
    text = (DATA / "valid.yaml").read_text()
    text = text.replace("lr: 1e-6", "lr: 0").replace("name: tiny", "name: Tiny")
    text = text.replace("max_tokens: 16", "max_tokens: '16'")
    lines = [p.line for p in problems_of(text)]
    assert lines == sorted(lines) and len(lines) == 3


# --------------------------------------------------------------------------- every problem at once


def test_a_section_rule_runs_beside_a_bad_key_of_its_section(problems_of) -> None:
    """pydantic skips a model's validators when one of its keys is wrong; the loader runs
    them on what did validate, so both problems come in one run, each at its line."""
    text = (DATA / "valid.yaml").read_text().replace("top_k: 2", "top_k: 9")
    text = text.replace("    num_layers: 2\n", "    num_layers: two\n")
    text = text.replace("num_query_groups: 2", "num_query_groups: 3")
    problems = problems_of(text)
    assert [(p.path, p.line, p.message) for p in problems] == [
        (("model", "architecture"), 4,
         "num_attention_heads (4) is not a multiple of num_query_groups (3)"),
        (("model", "architecture", "num_layers"), 6, "expected an integer, got the string 'two'"),
        (("model", "architecture", "moe"), 12,
         "top_k (9) exceeds num_experts (8); a token cannot be routed to more experts than exist"),
    ]


def test_a_section_rule_that_needs_a_bad_key_says_nothing(problems_of, spec_dict) -> None:
    """A rule that reads a value that did not validate is skipped: one problem, not two."""
    spec_dict["model"]["architecture"]["num_query_groups"] = "two"
    spec_dict["model"]["architecture"]["moe"]["num_experts"] = "eight"
    problems = problems_of(spec_dict)
    assert [p.path[-1] for p in problems] == ["num_query_groups", "num_experts"]


def test_a_stage_rule_runs_beside_a_bad_key_of_its_stage(problems_of, spec_dict) -> None:
    spec_dict["filters"] = [{"type": "offline_pass_rate", "min_pass_rate": 0.9,
                             "max_pass_rate": 0.5, "samples_per_prompt": "8"}]
    problems = problems_of(spec_dict)
    assert [(p.path, p.message[:28]) for p in problems] == [
        (("filters", 0), "min_pass_rate (0.9) ≥ max_pa"),
        (("filters", 0, "samples_per_prompt"), "expected an integer, got the")]


# --------------------------------------------------------------------------- secrets
# Every value of a spec is written into the bundle: a secret in cluster.env (by its name or
# its value), a credential-looking string or a URL with a password in any field is refused
# at its key's line, and never shown whole.

HF = "hf_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3h"  # the shape of a Hugging Face token
CREDENTIALS = {
    "hugging-face": HF,
    "openai": "sk-" + "Zx9" * 16,
    "openai-project": "sk-proj-" + "a1B_c2D-" * 4,
    "github-classic": "ghp_" + "A1b2C3d4E5" * 4,
    "github-oauth": "gho_" + "Q9w8E7r6T5" * 4,
    "github-fine-grained": "github_pat_11ABCDEFG0" + "x1Y2z3" * 8,
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "slack": "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOp",
    "pem": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH "
           "PRIVATE KEY-----",
    "url-password": "postgres://bob:hunter2pw@db.example:5432/runs",
}


def env_spec(env: dict) -> str:
    """valid.yaml with a cluster.env section, written as YAML (its first key on line 34)."""
    lines = "".join(f"    {k}: {yaml.safe_dump(v, default_style=chr(34)).strip()}\n"
                    for k, v in env.items())
    return (DATA / "valid.yaml").read_text() + "cluster:\n  env:\n" + lines


def shown(problems) -> str:
    return "\n".join(p.format() for p in problems)


@pytest.mark.parametrize("name", [
    "KEY", "SSH_KEY", "PRIVATE_KEY", "SSH_PRIVATE_KEY", "WANDB_KEY", "JUDGE_KEY", "DB_PASS",
    "GITHUB_PAT", "AUTH", "HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
    "OAUTH_CLIENT_SECRET", "PROXY_AUTH", "SESSION_COOKIE", "MY_PRIVATE_THING", "db_pwd",
    "GH_AUTHTOKEN", "HTTP_BASICAUTH",
])
def test_a_secret_name_in_cluster_env_is_refused_at_its_line(problems_of, name) -> None:
    (p,) = problems_of(env_spec({"OMP_NUM_THREADS": "8", name: "s3cr3t-value"}))
    assert (p.path, p.line) == (("cluster", "env", name), 35)
    assert p.message.startswith(f"{name} looks like a secret (its name has '")
    assert "written into the bundle" in p.message
    assert "cluster.env_passthrough" in (p.suggestion or "")
    assert "s3cr3t-value" not in p.format()


def test_common_variables_are_no_secrets(write_spec) -> None:
    """Names the old substring match refused (TOKENIZERS_PARALLELISM) or a sloppy one would
    (a word that only contains KEY, PASS or AUTH; a variable that points at a key)."""
    env = dict.fromkeys([
        "TOKENIZERS_PARALLELISM", "NCCL_DEBUG", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME",
        "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS",
        "PYTORCH_CUDA_ALLOC_CONF", "HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER",
        "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "WANDB_BASE_URL",
        "TRANSFORMERS_OFFLINE", "VLLM_ATTENTION_BACKEND", "MAX_JOBS", "KEYBOARD_LAYOUT",
        "MONKEY", "GIT_AUTHOR_NAME", "NUM_PASSES", "HF_TOKEN_PATH", "SSL_KEY_FILE",
        "SSH_AUTH_SOCK", "PWD", "GOOGLE_APPLICATION_CREDENTIALS", "AWS_SHARED_CREDENTIALS_FILE",
    ], "false")
    assert load_spec(write_spec(env_spec(env))).spec.cluster.env == env


@pytest.mark.parametrize("kind", sorted(CREDENTIALS))
def test_a_credential_value_is_refused_under_any_name(problems_of, kind) -> None:
    value = CREDENTIALS[kind]
    (p,) = problems_of(env_spec({"HF_HOME": "/scratch/hf", "SETTING": value}))
    assert (p.path, p.line) == (("cluster", "env", "SETTING"), 35)
    assert p.message.startswith(f"'{value[:4]}***' ")
    assert "cluster.env_passthrough" in (p.suggestion or "")
    assert value[5:] not in p.format()  # masked: at most its first 4 characters


@pytest.mark.parametrize("value", [
    "/scratch/hf_cache/models_and_datasets_xyz", "hf_transfer", "sk-learn",
    "task-abcdefghijklmnopqrstuvwxyz-0123", "disk-0123456789abcdefghijklmnop",
    "AKIA_SHORT", "xoxb-1", "0123456789abcdef0123456789abcdef01234567",  # a git commit
    "https://user@judge.example:8443/v1", "ssh://git@github.com:22/org/repo.git",
    "-----BEGIN CERTIFICATE-----", "https://judge.example/v1?mode=fast", "gpt-4o-mini",
])
def test_values_that_only_resemble_credentials_pass(write_spec, value) -> None:
    assert load_spec(write_spec(env_spec({"SETTING": value}))).spec.cluster.env["SETTING"] == value


@pytest.mark.parametrize(("path", "value"), [
    (("model", "checkpoint"), HF),
    (("data", "train"), "https://bob:hunter2pw@data.example/train.jsonl"),
    (("filters", 0, "proxy_model"), CREDENTIALS["openai"]),
    (("description",), "key " + CREDENTIALS["github-classic"]),
])
def test_a_credential_in_any_field_is_refused(problems_of, spec_dict, path, value) -> None:
    spec_dict["filters"] = [{"type": "offline_pass_rate"}]
    node = spec_dict
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    (p,) = problems_of(spec_dict)
    assert p.path == path and "written into the bundle" in p.message
    assert value[5:] not in p.format()


def test_a_credential_in_a_list_names_its_item(problems_of, spec_dict) -> None:
    spec_dict["cluster"] = {"container": {"image": "img.sqsh",
                                          "mounts": ["/data:/data", f"/x/{HF}:/y"]}}
    (p,) = problems_of(spec_dict)
    assert p.path == ("cluster", "container", "mounts")
    assert p.message.startswith("item 1: '/x/h***' looks like a Hugging Face token")


def test_a_judge_url_with_a_password_is_refused(problems_of, spec_dict) -> None:
    spec_dict["reward"]["judge"] = {"type": "http", "model": "judge",
                                    "url": "https://bob:hunter2pw@judge.example/v1"}
    (p,) = problems_of(spec_dict)
    assert p.path == ("reward", "judge", "url")
    assert p.message.startswith("'http***' holds a URL with a password")
    assert "reward.judge.api_key_env" in (p.suggestion or "")
    assert "cluster.env_passthrough" in (p.suggestion or "")
    assert "hunter2pw" not in p.format() and "bob" not in p.format()


def test_a_judge_url_without_a_password_passes(write_spec, spec_dict) -> None:
    spec_dict["reward"]["judge"] = {"type": "http", "model": "judge", "api_key_env": "JUDGE_KEY",
                                    "url": "https://judge@judge.example:8443/v1"}
    spec_dict["cluster"] = {"env_passthrough": ["JUDGE_KEY"]}
    text = yaml.safe_dump(spec_dict, sort_keys=False)
    assert load_spec(write_spec(text)).spec.reward.judge.url.endswith(":8443/v1")


def test_a_secret_of_the_wrong_type_is_not_shown(problems_of) -> None:
    """DB_PASS: 12345678 is an integer: its type error, and its hint, mask it too."""
    text = env_spec({}) + "    DB_PASS: 12345678\n    SETTING: 1234567\n"
    problems = problems_of(text)
    assert "12345678" not in shown(problems)
    assert any("got the integer 12***" in p.message for p in problems)
    assert any(p.message.endswith("got the integer 1234567") for p in problems)  # no secret
def _float_fields(model: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The dotted paths of every float field of `model`'s sections (tagged unions skipped)."""
    from spec.walk import is_model, union_members, unwrap

    found = []
    for name, f in model.model_fields.items():
        for tp in union_members(f.annotation) or [unwrap(f.annotation)]:
            tp = unwrap(tp)
            if tp is float:
                found.append((*prefix, name))
            elif is_model(tp) and "type" not in tp.model_fields:
                found += _float_fields(tp, (*prefix, name))
    return sorted(set(found))


def test_every_float_field_is_found() -> None:
    from spec.models import Spec

    paths = {".".join(p) for p in _float_fields(Spec)}
    assert {"cluster.gpu_memory_gb", "train.optimizer.lr", "algorithm.correction.cap"} <= paths


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_field_refuses_a_non_finite_number(write_spec, spec_dict, value) -> None:
    """`.inf` used to pass every `> 0` bound and crash the memory estimate (NaN → int)."""
    import yaml

    from spec.models import Spec

    spec = write_spec(yaml.safe_dump(spec_dict))
    for path in _float_fields(Spec):
        key = ".".join(path)
        with pytest.raises(SpecError) as info:
            load_spec(spec, [f"{key}={value}"])
        messages = {p.message for p in info.value.problems if p.path == path}
        assert any(m.startswith("must be a finite number") for m in messages), (
            key, info.value.format())


def test_a_huge_gpu_memory_is_refused_not_overflowed(write_spec, spec_dict) -> None:
    import yaml

    spec_dict["cluster"] = {"gpu_memory_gb": 1e308}
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(yaml.safe_dump(spec_dict)))
    assert [p.message for p in info.value.problems] == ["must be at most 100000, got 1e+308"]


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("train", "seed", -1, "must be at least 0, got -1"),
    ("train", "seed", 2**63, f"must be less than {2**63}, got {2**63}"),
    ("cluster", "gpus_per_node", 10**8, "must be at most 256, got 100000000"),
])
def test_seeds_and_node_sizes_every_consumer_takes(problems_of, spec_dict, section: str,
                                                   key: str, value: int, message: str) -> None:
    """numpy's generators refuse a negative seed and torch one over 64 bits (at job start);
    a local CPU spec would start gpus_per_node processes."""
    spec_dict.setdefault(section, {})[key] = value
    (p,) = problems_of(spec_dict)
    assert (p.path, p.message) == ((section, key), message)


def test_a_key_of_another_stage_type_names_that_type(problems_of, spec_dict) -> None:
    """A stage whose type was changed keeps the other type's keys: say whose they are."""
    spec_dict["filters"] = [{"type": "history", "proxy_model": "policy"}]
    problems = [p for p in problems_of(spec_dict) if p.path[-1] == "proxy_model"]
    assert [p.suggestion for p in problems] == [
        "'proxy_model' is a key of the offline_pass_rate type, not of history"]

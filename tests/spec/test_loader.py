"""YAML loading: line numbers, the spec's scalar rules, and one clear problem per bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from spec import yaml_reader
from spec.errors import Problem, SpecError
from spec.loader import (
    MAX_BYTES,
    NODE_BUDGET,
    SpecSource,
    load_data,
    load_spec,
    load_value,
    validate,
)

DATA = Path(__file__).parent / "data"


def only_problem(path: str | Path, overrides: tuple[str, ...] = ()) -> Problem:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    assert len(info.value.problems) == 1, info.value.format()
    return info.value.problems[0]


def data_problems(text: str) -> list[Problem]:
    with pytest.raises(SpecError) as info:
        load_data(text, "s.yaml")
    return info.value.problems


# --------------------------------------------------------------------------- valid files


def test_valid_file_loads_with_lines() -> None:
    src = load_spec(DATA / "valid.yaml")
    assert isinstance(src, SpecSource)
    assert src.file == str(DATA / "valid.yaml")
    assert src.spec.name == "tiny"
    assert src.spec.train.optimizer.lr == 1e-6
    assert src.spec.router_replay.mode == "off"
    assert src.raw["filters"][0]["action"] == "drop"
    loc = src.locations
    assert loc[("name",)] == 2
    assert loc[("model", "architecture", "moe")] == 12
    assert loc[("model", "architecture", "moe", "top_k")] == 12  # flow mapping: same line
    assert loc[("train", "optimizer", "lr")] == 17
    assert loc[("reward", "verifiers", 0)] == 25
    assert loc[("filters", 0)] == 28
    assert loc[("filters", 0, "oversample")] == 30
    assert loc[("filters", 1)] == 31


def test_locate_uses_the_longest_known_prefix() -> None:
    src = load_spec(DATA / "valid.yaml")
    # A compiler problem about a key the user did not write is shown at its section.
    p = src.locate(Problem(("train", "parallelism", "tensor"), "TP does not divide the heads"))
    assert (p.file, p.line) == (str(DATA / "valid.yaml"), 13)
    p = src.locate(Problem(("filters", 1, "window"), "x"))
    assert p.line == 31
    p = src.locate(Problem(("model", "architecture", "num_layers"), "x"))
    assert p.line == 6
    p = src.locate(Problem(("cluster", "gpus_per_node"), "x"))
    assert (p.file, p.line) == (str(DATA / "valid.yaml"), None)
    assert p.format().startswith(f"{DATA / 'valid.yaml'}: error: cluster.gpus_per_node: x")


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-6", 1e-6), ("1.5e-4", 1.5e-4), ("3E-4", 3e-4), ("-2e+3", -2000.0), ("1.", 1.0),
     (".5", 0.5), ("1_000", 1000), ("0x1f", 31), ("0o17", 15), ("08", 8), (".inf", float("inf")),
     ("true", True), ("False", False), ("null", None), ("~", None), ("", None)],
)
def test_numbers_booleans_and_null(text: str, value: object) -> None:
    got = load_value(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "text", ["off", "on", "yes", "no", "y", "n", "24:00:00", "2024-01-01", "1e", "0x", "1.2.3",
             "'1e-6'", '"true"', "!!str 8", "'<<'"],
)
def test_strings_stay_strings(text: str) -> None:
    assert isinstance(load_value(text), str)


def test_exponent_floats_validate_as_floats(write_spec, spec_dict) -> None:
    for lr in ("1e-6", "1.5e-4", "3E-4"):
        text = write_spec(f"""\
name: tiny
model: {{architecture: {{family: qwen3_moe, num_layers: 2, hidden_size: 64, ffn_hidden_size: 128,
  num_attention_heads: 4, vocab_size: 512}}}}
train: {{global_batch_size: 64, steps: 10, optimizer: {{lr: {lr}, adam_eps: 1e-8}}}}
rollout: {{n: 8, prompts_per_step: 8, max_tokens: 16}}
data: {{generator: {{type: arithmetic}}}}
reward: {{verifiers: [{{type: arithmetic}}]}}
cluster: {{time_limit: 24:00:00}}
""")
        spec = load_spec(text).spec
        assert spec.train.optimizer.lr == float(lr)
        assert spec.cluster.time_limit == "24:00:00"


def test_router_replay_mode_off_is_a_string(write_spec) -> None:
    text = (DATA / "valid.yaml").read_text().replace("{mode: off}", "\n  mode: off")
    assert load_spec(write_spec(text)).spec.router_replay.mode == "off"


def test_anchors_aliases_and_merge_keys() -> None:
    src = load_spec(DATA / "merge_keys.yaml")
    spec = src.spec
    assert spec.eval.temperature == 0.7 and spec.eval.samples == 4
    assert [(v.type, v.weight) for v in spec.reward.verifiers] == [("arithmetic", 1.0),
                                                                   ("math", 0.5)]
    # A merged key is located where its value is written (the anchor).
    assert src.locations[("eval", "temperature")] == 20
    assert src.locations[("eval", "samples")] == 31


def test_merge_precedence() -> None:
    data, _ = load_data("a: &a {x: 1, y: 1}\nb: &b {y: 2, z: 2}\nc: {<<: [*a, *b], x: 3}\n", "s")
    assert data["c"] == {"x": 3, "y": 1, "z": 2}


def test_merged_unknown_key_points_at_the_anchor(problems_of) -> None:
    text = (DATA / "merge_keys.yaml").read_text().replace(
        "    temperature: 0.7\n", "    temperature: 0.7\n    top_p: 0.9\n")
    (p,) = problems_of(text)
    assert (p.path, p.line) == (("eval", "top_p"), 21)
    assert p.message == "unknown key 'top_p'"
    assert p.suggestion == "'top_p' belongs under rollout.sampling"


# --------------------------------------------------------------------------- file failures


def test_missing_file_suggests_a_neighbour(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text("name: x\n")
    p = only_problem(tmp_path / "spce.yaml")
    assert p.message == "file not found"
    assert p.suggestion == f"did you mean {tmp_path / 'spec.yaml'}?"
    assert p.format() == (f"{tmp_path / 'spce.yaml'}: error: file not found\n"
                          f"    hint: did you mean {tmp_path / 'spec.yaml'}?")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("name: x\n")
    p = only_problem(tmp_path)
    assert p.message == "is a directory, not a spec file"
    assert p.suggestion == f"give the spec file: {tmp_path / 'run.yaml'}"


def test_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\n")

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    p = only_problem(path)
    assert p.message == "cannot read the file: permission denied"
    assert p.file == str(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: x\ndescription: caf\xe9\n")
    p = only_problem(path)
    assert (p.message, p.line) == ("the file is not UTF-8 text (byte 0xe9)", 2)


def test_empty_file(write_spec) -> None:
    p = only_problem(write_spec(""))
    assert p.message == "the file is empty"
    assert "name, model, train, rollout, data, reward" in p.suggestion


def test_comments_only() -> None:
    p = only_problem(DATA / "comments_only.yaml")
    assert p.message == "the file has no content, only comments or blank lines"


def test_malformed_yaml_names_line_and_column() -> None:
    p = only_problem(DATA / "malformed.yaml")
    assert p.line == 5
    assert p.message == "invalid YAML at column 8: expected ',' or '}', but got ':'"
    assert p.suggestion == "while parsing a flow mapping that starts at line 4"


def test_tab_indentation() -> None:
    (p,) = data_problems("name: tiny\ntrain:\n\tsteps: 1\n")
    assert p.line == 3
    assert "cannot start any token" in p.message
    assert p.suggestion == "indent with spaces: YAML does not allow tabs"


def test_a_tab_after_a_value_is_not_called_indentation() -> None:
    (p,) = data_problems("name: tiny\ntrain:\n  steps: 1\t\n")
    assert (p.line, p.suggestion) == (
        3, "remove the tab at column 11 (YAML allows no tab here; quote a value that holds one)")


def test_an_indentation_that_matches_no_key_above() -> None:
    (p,) = data_problems("name: tiny\nmodel:\n    checkpoint: null\n  architecture: {}\n")
    assert p.line == 4
    assert p.suggestion.startswith("this line's indentation matches no key above it")


def test_bad_indentation() -> None:
    (p,) = data_problems("name: tiny\ntrain: 1\n  steps: 2\n")
    assert p.line == 3
    assert p.message == "invalid YAML at column 8: mapping values are not allowed here"


def test_unclosed_bracket() -> None:
    (p,) = data_problems("name: tiny\nfilters: [a, b\n")
    assert p.suggestion == ("the file ends inside an unclosed bracket or quote "
                            "(while parsing a flow sequence that starts at line 2)")


def test_undefined_alias() -> None:
    (p,) = data_problems("name: *base\n")
    assert (p.line, p.message) == (1, "invalid YAML at column 7: found undefined alias 'base'")


def test_control_character() -> None:
    (p,) = data_problems("name: a\ndescription: b\x07\n")
    assert p.line == 2 and p.message.startswith("invalid character #x0007")


@pytest.mark.parametrize(
    ("text", "found"),
    [("- name: a\n- name: b\n", "a list"), ("tiny\n", "the string 'tiny'"),
     ("42\n", "the integer 42"), ("null\n", "null (an empty value)")],
)
def test_top_level_must_be_a_mapping(text: str, found: str) -> None:
    (p,) = data_problems(text)
    assert p.message == f"the top level of the file is {found}, not a mapping of sections"
    assert p.line == 1


def test_multiple_documents() -> None:
    p = only_problem(DATA / "multi_document.yaml")
    assert p.line == 3
    assert p.message == "the file holds more than one YAML document; a spec is one document"
    assert p.suggestion == "remove the '---' at line 3, or split the file"


def test_single_document_with_markers_is_fine() -> None:
    data, loc = load_data("---\nname: a\n...\n", "s.yaml")
    assert data == {"name": "a"} and loc[("name",)] == 2


def test_duplicate_keys_name_both_lines() -> None:
    p = only_problem(DATA / "duplicate_keys.yaml")
    assert p.path == ("train", "optimizer", "lr")
    assert p.line == 7
    assert p.message == "duplicate key 'lr' (first at line 5, again at line 7)"


def test_every_duplicate_is_reported() -> None:
    problems = data_problems("name: a\nx: {k: 1, k: 2}\nname: b\n")
    assert [(p.path, p.line) for p in problems] == [(("x", "k"), 2), (("name",), 3)]


def test_billion_laughs_is_rejected_by_the_value_budget() -> None:
    p = only_problem(DATA / "billion_laughs.yaml")
    assert p.message.startswith(f"the document expands to more than {NODE_BUDGET:,} values")
    assert "billion laughs" in p.message
    assert p.line is not None and p.path


def test_an_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    """A 10 MB file of plain keys: refused from its size (not blamed on aliases), unparsed."""
    big = tmp_path / "big.yaml"
    line = "key_{:07d}: some plain value of a plain key\n"
    with big.open("w") as f:
        for i in range(10 * 2**20 // len(line.format(0)) + 1):
            f.write(line.format(i))
    size = big.stat().st_size
    p = only_problem(big)
    assert p.file == str(big) and p.path == ()
    assert f"{size:,} bytes" in p.message and f"{MAX_BYTES:,} bytes" in p.message
    assert "alias" not in p.message and "laughs" not in p.message
    assert p.suggestion and "few KB" in p.suggestion


def test_oversized_text_is_refused_by_load_data() -> None:
    (p,) = data_problems("a: 1\n" + "#" * MAX_BYTES)
    assert f"{MAX_BYTES:,} bytes" in p.message and "alias" not in p.message


def test_too_many_plain_values_are_not_blamed_on_aliases(monkeypatch) -> None:
    """Under the byte limit but over the value budget, with no alias: the count is named."""
    monkeypatch.setattr(yaml_reader, "NODE_BUDGET", 50)
    (p,) = data_problems("".join(f"k{i}: {i}\n" for i in range(80)))
    assert p.message.startswith("the document holds more than 50 values")
    assert "alias" not in p.message and p.line is not None


def test_aliases_below_the_budget_work() -> None:
    text = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
    data, _ = load_data(text + "c: [*b, *b, *b]\n", "s.yaml")
    assert len(data["c"]) == 3 and data["c"][2][7][9] == 10


def test_recursive_alias() -> None:
    (p,) = data_problems("a: &a [1, *a]\n")
    assert p.message == "an alias refers to a node that contains it (a recursive structure)"


def test_non_string_keys() -> None:
    problems = data_problems("name: a\n1: x\ntrain:\n  true: 1\n  ~: 2\n[a, b]: 3\n")
    assert [(p.path, p.line, p.message) for p in problems] == [
        ((), 2, "key '1' is the integer 1, not a string"),
        (("train",), 4, "key 'true' is the boolean true, not a string"),
        (("train",), 5, "key '~' is null (an empty value), not a string"),
        ((), 6, "a key must be a string, not a list"),
    ]
    assert problems[0].suggestion == "quote it: '1'"


def test_unsupported_tags() -> None:
    problems = data_problems("a: !!binary aGk=\nb: !!int x\nc: !!python/name:os.system ''\n")
    assert [p.message for p in problems] == [
        "unsupported YAML tag !!binary", "'x' is not a valid !!int",
        "unsupported YAML tag !!python/name:os.system",
    ]


def test_validate_without_a_file() -> None:
    """The compiler can validate data built in code: problems name the file given."""
    with pytest.raises(SpecError) as info:
        validate({"name": "x"}, {}, "<code>")
    assert {p.file for p in info.value.problems} == {"<code>"}
    assert {p.path for p in info.value.problems} == {
        ("model",), ("train",), ("rollout",), ("data",), ("reward",)}

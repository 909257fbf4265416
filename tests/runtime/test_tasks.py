"""The embedded arithmetic task: determinism, disjoint splits, correct answers, difficulty."""

from __future__ import annotations

import json
import operator
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.files import read_jsonl
from runtime.rewards import ArithmeticVerifier
from runtime.tasks.arithmetic import (
    ArithmeticConfig,
    difficulty,
    generate_splits,
    space_size,
    write_dataset,
)

PROMPT = re.compile(r"^(\d+)([+\-*])(\d+)=$")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
TINY = {"type": "arithmetic", "seed": 0, "train_size": 2000, "eval_size": 200,
        "min_digits": 1, "max_digits": 3, "operations": ["+", "-"]}


def _parse(prompt: str) -> tuple[int, str, int]:
    m = PROMPT.match(prompt)
    assert m, prompt
    return int(m[1]), m[2], int(m[3])


def test_deterministic_and_seed_dependent() -> None:
    cfg = ArithmeticConfig.from_spec(TINY)
    assert generate_splits(cfg) == generate_splits(ArithmeticConfig.from_spec(TINY))
    other = generate_splits(ArithmeticConfig.from_spec({**TINY, "seed": 1}))
    assert [e.prompt for e in other[0]] != [e.prompt for e in generate_splits(cfg)[0]]


def test_splits_disjoint_unique_and_sized() -> None:
    train, evals = generate_splits(ArithmeticConfig.from_spec(TINY))
    assert len(train) == 2000 and len(evals) == 200
    tp, ep = [e.prompt for e in train], [e.prompt for e in evals]
    assert len(set(tp)) == len(tp) and len(set(ep)) == len(ep)
    assert not set(tp) & set(ep)
    assert [e.id for e in train] == list(range(2000)) and [e.id for e in evals] == list(range(200))


def test_eval_split_does_not_depend_on_train_size() -> None:
    _, a = generate_splits(ArithmeticConfig.from_spec(TINY))
    _, b = generate_splits(ArithmeticConfig.from_spec({**TINY, "train_size": 50}))
    assert a == b


def test_answers_are_correct_and_verifier_agrees() -> None:
    cfg = ArithmeticConfig.from_spec({**TINY, "operations": ["+", "-", "*"], "train_size": 600})
    train, evals = generate_splits(cfg)
    verifier = ArithmeticVerifier()
    negatives = 0
    for ex in train + evals:
        a, op, b = _parse(ex.prompt)
        assert 1 <= len(str(a)) <= 3 and 1 <= len(str(b)) <= 3
        assert ex.answer == str(OPS[op](a, b))
        negatives += ex.answer.startswith("-")
        assert set(ex.prompt + ex.answer) <= set("0123456789+-*=")
        assert verifier.score(ex.prompt, ex.answer, ex.answer) == 1.0
        assert verifier.score(ex.prompt, ex.answer + "1", ex.answer) == 0.0
    assert negatives > 0  # subtraction gives negative answers too


def test_difficulty_spread() -> None:
    train, _ = generate_splits(ArithmeticConfig.from_spec(TINY))
    hist = Counter(e.difficulty for e in train)
    lengths = Counter(len(str(_parse(e.prompt)[0])) for e in train)
    assert set(lengths) == {1, 2, 3}  # every operand length occurs
    assert min(hist) == 2 and max(hist) >= 8  # 1+1-digit easy ones … 3+3-digit with carries
    assert len(hist) >= 6
    assert max(hist.values()) < 0.5 * len(train)  # no single level dominates


@pytest.mark.parametrize(("a", "op", "b", "want"), [
    (1, "+", 2, 2), (99, "+", 1, 5), (95, "+", 5, 5), (100, "-", 1, 6),  # 100−1: two borrows
    (1, "-", 100, 6), (50, "-", 20, 4), (12, "*", 34, 4), (9, "*", 9, 3),
])
def test_difficulty_examples(a: int, op: str, b: int, want: int) -> None:
    assert difficulty(a, op, b) == want


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_carries_match_digit_sum_identity(a: int, b: int) -> None:
    # digit_sum(a) + digit_sum(b) − digit_sum(a + b) = 9 · carries (each carry turns 10 into 1).
    def ds(x: int) -> int:
        return sum(map(int, str(x)))
    carries = difficulty(a, "+", b) - len(str(a)) - len(str(b))
    assert ds(a) + ds(b) - ds(a + b) == 9 * carries


def test_space_limits() -> None:
    small = {**TINY, "min_digits": 1, "max_digits": 1, "operations": ["+"], "train_size": 90,
             "eval_size": 10}
    assert space_size(ArithmeticConfig.from_spec(small)) == 100
    assert space_size(ArithmeticConfig.from_spec(TINY)) == 2 * (10 + 90 + 900) ** 2
    train, evals = generate_splits(ArithmeticConfig.from_spec(small))
    assert len({e.prompt for e in train + evals}) == 100  # the whole space, no repeats
    with pytest.raises(ValueError, match="exceeds the 100 distinct prompts"):
        ArithmeticConfig.from_spec({**small, "train_size": 95, "eval_size": 10})
    with pytest.raises(ValueError, match="min_digits"):
        ArithmeticConfig.from_spec({**TINY, "min_digits": 3, "max_digits": 2})
    with pytest.raises(ValueError, match="operations"):
        ArithmeticConfig.from_spec({**TINY, "operations": ["/"]})


def test_write_dataset_uses_keys(tmp_path: Path) -> None:
    cfg = ArithmeticConfig.from_spec({**TINY, "train_size": 30, "eval_size": 5})
    meta = write_dataset(tmp_path, cfg, prompt_key="question", answer_key="target")
    rows = list(read_jsonl(tmp_path / "train.jsonl"))
    assert len(rows) == 30 and set(rows[0]) == {"id", "question", "target", "difficulty"}
    assert len(list(read_jsonl(tmp_path / "eval.jsonl"))) == 5
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert meta["train"]["count"] == 30 and meta["generator"]["operations"] == ["+", "-"]
    with pytest.raises(ValueError, match="clash"):
        write_dataset(tmp_path, cfg, prompt_key="id")

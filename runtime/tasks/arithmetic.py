r"""The embedded verifiable task: integer arithmetic generated from a seed.

A prompt is ``"<a><op><b>="`` with operands written in decimal without signs or spaces
(``"37+58="``, ``"7-302="``, ``"12*34="``); the answer is the exact integer result in
decimal, negative results with a leading minus (``"-295"``). Only the characters
``0-9 + - * =`` occur, which the character-level tokenizer of ``runtime.policy`` covers.

Sampling (``data.generator``: seed, train_size, eval_size, min_digits, max_digits,
operations). Per example::

    op      ~ uniform(operations)
    d_a,d_b ~ uniform{min_digits … max_digits}         (independently per operand)
    a       ~ uniform over the d_a-digit numbers: 0…9 for d = 1, 10^(d−1) … 10^d − 1 else

so short and long operands, and mixed lengths, all occur. ``difficulty`` counts the steps
of the schoolbook method::

    difficulty = d_a + d_b + extra
    extra(+)   = carries: columns i where a_i + b_i + carry_in ≥ 10
    extra(−)   = borrows of |a − b| = big − small: columns where big_i − borrow_in < small_i
    extra(*)   = digit products a_i·b_j ≥ 10 (each one carries into the next column)

(``"1+2="`` → 2, ``"99+1="`` → 3 + 2 = 5).

Splits are disjoint and stable: the eval split is drawn first from its own random stream
(derived from ``seed`` and the split name, so it does not change with ``train_size``); the
train split comes from a second stream and skips every prompt already drawn. Duplicates are
rejected within a split too. Asking for more prompts than the digit/operation space holds
is an error. Rows are ``{"id", <prompt_key>, <answer_key>, "difficulty"}`` with per-split
ids 0 … n−1 (the row's index).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "OPERATIONS",
    "ArithmeticConfig",
    "Example",
    "difficulty",
    "generate_splits",
    "space_size",
    "summary",
    "write_dataset",
    "write_jsonl",
]

OPERATIONS = ("+", "-", "*")


@dataclass(frozen=True)
class ArithmeticConfig:
    """The ``data.generator`` section (``type`` is accepted and must be "arithmetic")."""

    seed: int = 0
    train_size: int = 2000
    eval_size: int = 200
    min_digits: int = 1
    max_digits: int = 3
    operations: tuple[str, ...] = field(default=("+", "-"))

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 ≤ min_digits ≤ max_digits, got {self.min_digits}, "
                             f"{self.max_digits}")
        if not self.operations or any(op not in OPERATIONS for op in self.operations):
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, "
                             f"got {list(self.operations)}")
        if self.train_size < 1 or self.eval_size < 0:
            raise ValueError("train_size must be ≥ 1 and eval_size ≥ 0")
        need, space = self.train_size + self.eval_size, space_size(self)
        if need > space:
            raise ValueError(
                f"train_size + eval_size = {need} exceeds the {space} distinct prompts of "
                f"{self.min_digits}–{self.max_digits}-digit operands with operations "
                f"{list(self.operations)}")

    @classmethod
    def from_spec(cls, generator: Mapping[str, Any]) -> ArithmeticConfig:
        """From the spec's ``data.generator`` dict (as found in a job config)."""
        kind = generator.get("type", "arithmetic")
        if kind != "arithmetic":
            raise ValueError(f"unknown data generator type {kind!r}; this task is 'arithmetic'")
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in generator.items() if k in names}
        if "operations" in kwargs:
            # Dedupe, keep order: a repeated operator would otherwise weigh the draw.
            kwargs["operations"] = tuple(dict.fromkeys(kwargs["operations"]))
        return cls(**kwargs)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["operations"] = list(self.operations)
        return {"type": "arithmetic", **d}


@dataclass(frozen=True)
class Example:
    id: int
    prompt: str
    answer: str
    difficulty: int

    def row(self, prompt_key: str = "prompt", answer_key: str = "answer") -> dict[str, Any]:
        if len({"id", "difficulty", prompt_key, answer_key}) != 4:
            raise ValueError(f"prompt_key {prompt_key!r} / answer_key {answer_key!r} clash "
                             "with each other or with 'id' / 'difficulty'")
        return {"id": self.id, prompt_key: self.prompt, answer_key: self.answer,
                "difficulty": self.difficulty}


def _digits(x: int) -> list[int]:
    """Decimal digits of x ≥ 0, least significant first."""
    return [int(c) for c in reversed(str(x))]


def _carries(a: int, b: int) -> int:
    carry = count = 0
    da, db = _digits(a), _digits(b)
    for i in range(max(len(da), len(db))):
        s = (da[i] if i < len(da) else 0) + (db[i] if i < len(db) else 0) + carry
        carry = int(s >= 10)
        count += carry
    return count


def _borrows(a: int, b: int) -> int:
    big, small = max(a, b), min(a, b)  # a − b = ±(big − small): the same column work
    borrow = count = 0
    dg, ds = _digits(big), _digits(small)
    for i in range(len(dg)):
        top = dg[i] - borrow
        borrow = int(top < (ds[i] if i < len(ds) else 0))
        count += borrow
    return count


def _product_carries(a: int, b: int) -> int:
    return sum(1 for x in _digits(a) for y in _digits(b) if x * y >= 10)


def difficulty(a: int, op: str, b: int) -> int:
    """Operand digits + carries/borrows/carrying digit products (module doc)."""
    extra = {"+": _carries, "-": _borrows, "*": _product_carries}[op](a, b)
    return len(str(a)) + len(str(b)) + extra


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _count(d: int) -> int:
    """How many d-digit operands exist (0 counts as a 1-digit number)."""
    return 10 if d == 1 else 9 * 10 ** (d - 1)


def space_size(cfg: ArithmeticConfig) -> int:
    """Distinct prompts the config can produce: |ops| · (Σ_d count(d))²."""
    per_operand = sum(_count(d) for d in range(cfg.min_digits, cfg.max_digits + 1))
    return len(cfg.operations) * per_operand**2


def _stream_seed(seed: int, split: str) -> int:
    # A stable 64-bit seed per (seed, split); Python's hash() is salted per process.
    return int.from_bytes(hashlib.sha256(f"rlspec-arithmetic:{seed}:{split}".encode()).digest()[:8],
                          "big")


def _operand(rng: random.Random, cfg: ArithmeticConfig) -> int:
    d = rng.randint(cfg.min_digits, cfg.max_digits)
    return rng.randint(0, 9) if d == 1 else rng.randint(10 ** (d - 1), 10**d - 1)


def _draw(cfg: ArithmeticConfig, split: str, n: int, taken: set[str]) -> list[Example]:
    """n new examples from the split's stream, skipping prompts in ``taken`` (updated)."""
    rng = random.Random(_stream_seed(cfg.seed, split))
    out: list[Example] = []
    # Rejection sampling; the cap only trips when the space is nearly exhausted.
    budget = 200 * n + 10_000
    while len(out) < n:
        if budget == 0:
            raise ValueError(
                f"could not draw {n} distinct {split} prompts in 200·n tries: the space of "
                f"{space_size(cfg)} prompts is nearly exhausted; raise max_digits or add operations")
        budget -= 1
        op = rng.choice(cfg.operations)
        a, b = _operand(rng, cfg), _operand(rng, cfg)
        prompt = f"{a}{op}{b}="
        if prompt in taken:
            continue
        taken.add(prompt)
        out.append(Example(len(out), prompt, str(_apply(a, op, b)), difficulty(a, op, b)))
    return out


def generate_splits(cfg: ArithmeticConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: deterministic in ``cfg``, disjoint, no duplicates."""
    # The config already checked that the space holds train_size + eval_size prompts.
    taken: set[str] = set()
    eval_split = _draw(cfg, "eval", cfg.eval_size, taken)
    train_split = _draw(cfg, "train", cfg.train_size, taken)
    return train_split, eval_split


def write_jsonl(path: str | os.PathLike[str], examples: Iterable[Example], *,
                prompt_key: str = "prompt", answer_key: str = "answer") -> int:
    """Write one JSON object per line; returns the number of rows."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.row(prompt_key, answer_key), ensure_ascii=False) + "\n")
            n += 1
    return n


def summary(examples: Sequence[Example]) -> dict[str, Any]:
    """Counts for meta.json: size, difficulty histogram, longest prompt/answer (characters)."""
    return {
        "count": len(examples),
        "difficulty": {str(k): v for k, v in sorted(Counter(e.difficulty for e in examples).items())},
        "max_prompt_chars": max((len(e.prompt) for e in examples), default=0),
        "max_answer_chars": max((len(e.answer) for e in examples), default=0),
    }


def write_dataset(out_dir: str | os.PathLike[str], cfg: ArithmeticConfig, *,
                  prompt_key: str = "prompt", answer_key: str = "answer") -> dict[str, Any]:
    """Write train.jsonl, eval.jsonl and meta.json into ``out_dir``; returns the meta."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = generate_splits(cfg)
    write_jsonl(out / "train.jsonl", train, prompt_key=prompt_key, answer_key=answer_key)
    write_jsonl(out / "eval.jsonl", evals, prompt_key=prompt_key, answer_key=answer_key)
    meta = {
        "task": "arithmetic",
        "generator": cfg.as_dict(),
        "prompt_key": prompt_key,
        "answer_key": answer_key,
        "files": {"train": "train.jsonl", "eval": "eval.jsonl"},
        "space_size": space_size(cfg),
        "train": summary(train),
        "eval": summary(evals),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    return meta

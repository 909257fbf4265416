"""``bench/evidence.py``: every configuration it runs validates (a typo in an override would
fail after the shared SFT start, minutes in), and its statistics handle runs that never reach
the target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.evidence import (
    FULL,
    QUICK,
    SPEC,
    Runner,
    _paired_ratios,
    loss_configs,
    zve_configs,
)
from bench.stats import median_ci, quantile
from compiler.api import validate


@pytest.mark.parametrize(("name", "sets"), zve_configs() + loss_configs(FULL),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_every_configuration_validates(name: str, sets: list[str], tmp_path: Path) -> None:
    for mode in (QUICK, FULL):
        validate(SPEC, Runner(tmp_path, mode).overrides(4, sets))


def test_ablations_remove_exactly_one_stage() -> None:
    configs = dict(zve_configs())
    assert list(configs)[:3] == ["vanilla GRPO", "DAPO dynamic sampling", "full ZVE"]
    ablations = [n for n in configs if n.startswith("ZVE − ")]
    assert sorted(ablations) == sorted(f"ZVE − {t}" for t in (
        "offline_pass_rate", "adaptive_group_size", "reward_shaping", "flat_groups", "history"))


def test_median_ci_with_unreached_targets() -> None:
    # 2 of 5 seeds never reach the target: the median is still finite, the upper bound is not
    m, lo, hi = median_ci([3.0, 1.0, math.inf, 2.0, math.inf])
    assert m == 3.0 and lo <= m and math.isinf(hi)
    assert quantile([1.0, 2.0, 3.0], 0.5) == 2.0
    # a constant sample has a degenerate interval
    assert median_ci([0.5] * 5) == (0.5, 0.5, 0.5)


def test_paired_ratios_mark_who_missed_the_target() -> None:
    inf = math.inf
    r = _paired_ratios([2.0, inf, 1.0, inf], [4.0, 3.0, inf, inf])
    assert r[:3] == [0.5, inf, 0.0] and math.isnan(r[3])

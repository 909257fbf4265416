"""The weight-sync probe's pieces (``runtime.sync_check``); the driver's use of them is in
test_driver.py, the real vLLM's side in tests/vllm."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.sync_check import (
    PROBE_TOKENS,
    WeightSyncError,
    check_weight_sync,
    probe_gap,
    probe_sequence,
)


def test_the_probe_is_the_end_of_the_first_rows_real_tokens() -> None:
    ids = torch.arange(1, 201).reshape(2, 100)
    mask = torch.zeros(2, 100, dtype=torch.long)
    mask[0, :90] = 1  # right-padded: 90 real tokens, the response at the end
    assert probe_sequence(ids, mask) == list(range(91 - PROBE_TOKENS, 91))
    mask[0, :] = 0
    mask[0, :5] = 1
    assert probe_sequence(ids, mask) == [1, 2, 3, 4, 5]
    mask[0, 1:] = 0
    assert probe_sequence(ids, mask) is None  # one token: nothing to score


def test_the_gap_is_the_mean_absolute_difference_and_nan_fails() -> None:
    assert probe_gap([-1.0, -2.0], [-1.5, -2.0]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        probe_gap([-1.0], [-1.0, -2.0])
    assert math.isnan(probe_gap([float("nan")], [-1.0]))
    with pytest.raises(WeightSyncError, match="over 3 probe tokens of weights v2 on e"):
        check_weight_sync(float("nan"), 3, 1.0, 2, what="probe tokens of weights v2 on e")
    check_weight_sync(0.5, 3, 1.0, 2)

"""Which prompts RL draws from after the offline screen (runtime.prompts.screened_prompts)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.errors import JobError
from runtime.filters.offline_pass_rate import ScreenResult
from runtime.prompts import screened_prompts


class _Pipeline:
    def load_screen(self, result: ScreenResult) -> list[int]:
        return result.survivors


def _ctx(tmp_path: Path, screened: list[int], kept: list[bool]) -> SimpleNamespace:
    out = tmp_path / "pass_rates"
    out.mkdir()
    ScreenResult(screened, np.full(len(screened), 0.5), np.array(kept),
                 samples_per_prompt=4).write_jsonl(out / "pass_rates.jsonl")
    (out / ".complete").write_text("{}")
    return SimpleNamespace(inputs={"pass_rates": None},
                           input_path=lambda name, check=True: out)


def test_rl_draws_the_survivors_and_says_which_prompts_went_unscreened(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctx = _ctx(tmp_path, [0, 1, 2], [True, False, True])  # prompt 3: too long for the proxy
    with caplog.at_level(logging.INFO):
        kept = screened_prompts(ctx, _Pipeline(), [0, 1, 2, 3], logging.getLogger("t"))
    assert kept == [0, 2]
    assert "1 prompt(s) of the train split were not screened" in caplog.text


def test_a_screen_that_kept_nothing_stops_the_run_rather_than_train_on_everything(
        tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, [0, 1], [False, False])
    with pytest.raises(JobError, match="kept no prompt of the train split"):
        screened_prompts(ctx, _Pipeline(), [0, 1], logging.getLogger("t"))

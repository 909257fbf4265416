"""The check that the rollout engines serve the weights the trainer holds.

A weight sync can answer 200 and not take effect (vLLM's CPU build reloads its experts in the
wrong layout; a reload can read a stale or partial folder; an engine can serve another
model). Every RL step compares, before any update uses them, the engine's log-probs of the
batch's response tokens with the trainer's own (old-policy pass, the weights the engines were
given), over the valid tokens:

    gap = Σ_t m_t · |log π_train(y_t) − log π_engine(y_t)| / Σ_t m_t

and stops the run when gap > ``system.weight_sync_tolerance``. Equal precision on both sides
(fp32, as the tests and the tiny example run) gives gaps near 1e-7; bf16 engines with MoE
routing differences stay around 1e-3 (the gap the paper reports before router replay); FP8
rollouts (``rollout.fp8``) add about 1e-3 (the tiny example) to 1e-1 by design, so their
tolerance must sit above that (``compiler.checks.fp8_rollout`` warns below 1e-2). The
step's ``train_inference_gap`` metric is this number.

That check needs a batch sampled by the weights the trainer holds, which bounded staleness
(``system.max_staleness`` > 0) rarely gives. So every published version also carries a
*probe*: the trainer's log-probs, under the new weights, of one sequence of the step's batch
(the last ``PROBE_TOKENS`` tokens of its first row, response included: a chat template's
opening tokens are near-certain under any weights, :func:`probe_sequence`). After loading that
version into the engines the driver asks each of them for the same sequence's log-probs
teacher-forced (vLLM's ``prompt_logprobs``) and applies the same tolerance to the mean gap
(:func:`probe_gap`), before any rollout is sampled with the new weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtime.errors import JobError

__all__ = ["PROBE_TOKENS", "WeightSyncError", "check_probe", "check_weight_sync", "probe_gap",
           "probe_sequence"]

PROBE_TOKENS = 64  # the probe's length at most: enough tokens to average, one cheap request


class WeightSyncError(JobError):
    """The engines' log-probs are not the trainer's: their weights (or numerics) differ. A
    ``JobError``: the message is meant for the user as is, from the trainer or the driver."""


def probe_sequence(input_ids: Any, attention_mask: Any) -> list[int] | None:
    """The probe: the last ``PROBE_TOKENS`` real tokens of the first row (right-padded rows),
    None when it has fewer than two (nothing to score)."""
    length = int(attention_mask[0].sum())
    if length < 2:
        return None
    return [int(t) for t in input_ids[0, max(0, length - PROBE_TOKENS):length]]


def probe_gap(engine: Sequence[float], trainer: Sequence[float]) -> float:
    """Mean |log π_engine − log π_train| over the probe's tokens after the first."""
    if len(engine) != len(trainer) or not len(trainer):
        raise ValueError(f"{len(engine)} engine and {len(trainer)} trainer probe log-probs")
    return sum(abs(float(a) - float(b)) for a, b in zip(engine, trainer, strict=True)) / len(trainer)


def check_weight_sync(gap: float, tokens: int, tolerance: float, version: int,
                      what: str | None = None) -> None:
    """Raise ``WeightSyncError`` when the mean gap over ``tokens`` exceeds ``tolerance``;
    ``what``: the tokens (default: the response tokens of step ``version``)."""
    if tokens > 0 and not gap <= tolerance:  # NaN fails too
        raise WeightSyncError(
            f"the rollout engines' log-probs differ from the trainer's by {gap:.3g} on average "
            f"over {tokens} {what or f'response tokens of step {version}'} "
            f"(system.weight_sync_tolerance "
            f"{tolerance:g}): the engines do not serve the weights of version {version}. A "
            "weight sync that did not take effect, an engine on another checkpoint, or other "
            "numerics (precision, FP8, routing without replay): check the rollout log, or "
            "raise the tolerance if the engines' numerics differ by design")


def check_probe(client: Any, folder: Path, version: int, tolerance: float, *,
                warn: Callable[[str], None]) -> float | None:
    """After the engines of ``client`` loaded the weights ``folder`` (``version``): each
    engine's log-probs of the probe in the folder's completion marker against the trainer's.
    Raises ``WeightSyncError`` past ``tolerance``, naming the engine; returns the largest gap,
    None when the version carries no probe (an empty batch made it)."""
    from runtime.files import COMPLETE_MARKER

    marker = folder / COMPLETE_MARKER
    if not marker.is_file():  # published atomically: the engines just read this folder
        warn(f"weights v{version} have no completion marker: its probe is skipped")
        return None
    probe = json.loads(marker.read_text()).get("probe")
    if not probe or len(probe["token_ids"]) < 2:
        return None
    gaps = [probe_gap(lp, probe["logprobs"]) for lp in client.prompt_logprobs(probe["token_ids"])]
    for endpoint, gap in zip(client.endpoints, gaps, strict=True):
        check_weight_sync(gap, len(probe["logprobs"]), tolerance, version,
                          what=f"probe tokens of weights v{version} on {endpoint}")
    return max(gaps)

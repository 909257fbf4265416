"""One sampled continuation as the rollout client returns it, read from a completion choice.

``to_completion`` turns a vLLM-shaped choice (``runtime.rollout.protocol``) into a
``Completion``: the exact token ids (``return_token_ids``, else the ``token_id:N`` strings of
``return_tokens_as_token_ids``), one log-prob per token, the routed experts decoded
(``runtime.router_replay.decode_routed_experts``) and checked to have
num_tokens − 1 − prompt_start rows, and the weight version: the oldest span of the choice's
``weight_versions`` (it bounds staleness), else the version probed before the request.
A choice the client cannot use raises ``RolloutError`` with ``answered=True`` (retried
elsewhere, the endpoint not marked down).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.rollout.client_errors import RolloutError
from runtime.rollout.protocol import CompletionChoice, WeightVersionSpan, parse_token_id_string
from runtime.router_replay import decode_routed_experts

__all__ = ["Completion", "to_completion"]


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: np.ndarray  # float32 [len(token_ids)]: logprob of each sampled token
    routed_experts: np.ndarray | None  # [len(prompt)+len(tokens)−1−prompt_start, layers, k]
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: str | None
    stop_reason: int | str | None = None
    weight_versions: tuple[WeightVersionSpan, ...] = ()
    endpoint: str = ""


def to_completion(
    endpoint: str,
    prompt: list[int],
    choice: CompletionChoice,
    probed_version: str | None,
    return_routed_experts: bool,
    prompt_start: int,
) -> Completion:
    if choice.token_ids is not None:
        token_ids = choice.token_ids
    elif choice.logprobs is not None:
        token_ids = [parse_token_id_string(t) for t in choice.logprobs.tokens]
    else:
        raise RolloutError(f"{endpoint}: choice without token_ids or logprobs", status=502,
                           answered=True)
    if choice.logprobs is None or len(choice.logprobs.token_logprobs) != len(token_ids):
        raise RolloutError(
            f"{endpoint}: choice {choice.index} lacks per-token logprobs", status=502,
            answered=True,
        )
    logprobs = np.asarray(
        [np.nan if v is None else v for v in choice.logprobs.token_logprobs], dtype=np.float32
    )
    routed = None
    if return_routed_experts:
        if choice.routed_experts is None:
            raise RolloutError(
                f"{endpoint} returned no routed_experts: start it with "
                "--enable-return-routed-experts (vLLM) / --return-routed-experts",
                endpoint=endpoint, answered=True,
            )
        routed = decode_routed_experts(choice.routed_experts)
        expected = len(prompt) + len(token_ids) - 1 - prompt_start
        if routed.shape[0] != expected:
            raise RolloutError(
                f"{endpoint}: routed_experts has {routed.shape[0]} rows, expected {expected} "
                f"(prompt {len(prompt)} + output {len(token_ids)} − 1 − start {prompt_start})",
                status=502, answered=True,
            )
    spans = tuple(choice.weight_versions or ())
    version = spans[0].weight_version if spans else probed_version
    return Completion(
        prompt_ids=list(prompt),
        token_ids=list(token_ids),
        logprobs=logprobs,
        routed_experts=routed,
        finish_reason=str(choice.finish_reason),
        weight_version=version,
        stop_reason=choice.stop_reason,
        weight_versions=spans,
        endpoint=endpoint,
    )

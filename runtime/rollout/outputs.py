"""What the embedded engine returns: output types, weight-version spans, and their
assembly from the token loop's buffers.

Routed experts (R3). The engine records the prompt's routes in the prefill and those
of the token fed in at each decode step; ``collect_outputs`` concatenates the rows.
Like vLLM the result covers prompt + output minus the last sampled token (never
forwarded): shape (num_tokens − 1 − routed_experts_prompt_start, moe_layers, top_k),
uint8 for ≤ 256 experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.rollout.protocol import WeightVersionSpan

if TYPE_CHECKING:
    import torch

__all__ = [
    "FINISH_ABORT",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "EngineError",
    "PromptOutput",
    "SampleOutput",
    "collect_outputs",
]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
# finish codes 0..3; 0 (still running) cannot survive the token loop, which ends every
# row by max_tokens at the latest.
_FINISH_NAMES = (FINISH_LENGTH, FINISH_STOP, FINISH_LENGTH, FINISH_ABORT)


class EngineError(ValueError):
    """A generation or weight-loading request the engine cannot serve; ``status`` is
    the HTTP status a server answers with (400 bad input, 503 shutting down)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SampleOutput:
    """One sampled continuation."""

    token_ids: list[int]
    logprobs: np.ndarray  # float32 [len(token_ids)]
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: int | None  # the stop token id; None for EOS, length and abort
    routed_experts: np.ndarray | None  # [P + len − 1 − prompt_start, moe_layers, top_k]
    weight_versions: tuple[WeightVersionSpan, ...]
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, best first

    @property
    def weight_version(self) -> str:
        """The version that sampled the first output token (the oldest one)."""
        return self.weight_versions[0].weight_version if self.weight_versions else ""


@dataclass(frozen=True)
class PromptOutput:
    prompt_token_ids: list[int]
    samples: list[SampleOutput]
    # with prompt_logprobs: (log p(x_t | x_<t), its rank in the vocabulary) for t ≥ 1
    prompt_logprobs: list[tuple[float, int]] | None = None



@dataclass
class _Spans:
    """Weight versions over the decode steps of one generate call: (version, first step)."""

    items: list[tuple[str, int]]

    def note(self, version: str, step: int) -> None:
        if self.items[-1][0] != version:
            self.items.append((version, step))

    def for_length(self, n_out: int) -> tuple[WeightVersionSpan, ...]:
        out: list[WeightVersionSpan] = []
        for i, (version, start) in enumerate(self.items):
            end = self.items[i + 1][1] if i + 1 < len(self.items) else n_out
            out.append(WeightVersionSpan(version, min(start, n_out), min(end, n_out)))
            if end >= n_out:
                break
        return tuple(out)


def collect_outputs(
    prompts: list[list[int]],
    n: int,
    tokens_out: torch.Tensor,
    logp_out: torch.Tensor,
    top_ids_out: torch.Tensor | None,
    top_lp_out: torch.Tensor | None,
    out_len: torch.Tensor,
    finish: torch.Tensor,
    stop_reason: torch.Tensor,
    prompt_routes: list[torch.Tensor],
    routes_out: torch.Tensor | None,
    prompt_start: int,
    spans: _Spans,
) -> list[PromptOutput]:
    """Turn the token loop's output buffers into one ``PromptOutput`` per prompt."""
    tokens = tokens_out.cpu().numpy()
    logps = logp_out.cpu().numpy()
    lens = out_len.cpu().tolist()
    codes = finish.cpu().tolist()
    stops = stop_reason.cpu().tolist()
    routes_np = None if routes_out is None else routes_out.cpu().numpy()
    top_ids = None if top_ids_out is None else top_ids_out.cpu().numpy()
    top_lps = None if top_lp_out is None else top_lp_out.cpu().numpy()
    results: list[PromptOutput] = []
    for i, prompt in enumerate(prompts):
        samples: list[SampleOutput] = []
        for j in range(n):
            b = i * n + j
            m = lens[b]
            routed = None
            if routes_np is not None and prompt_routes:
                total = len(prompt) + m - 1  # every token but the last sampled one
                full = np.concatenate([prompt_routes[i].numpy(), routes_np[b, : max(m - 1, 0)]])
                routed = np.ascontiguousarray(full[prompt_start:total])
            top = None
            if top_ids is not None and top_lps is not None:
                top = [
                    list(zip(top_ids[b, t].tolist(), top_lps[b, t].tolist(), strict=True))
                    for t in range(m)
                ]
            samples.append(
                SampleOutput(
                    token_ids=tokens[b, :m].tolist(),
                    logprobs=logps[b, :m].astype(np.float32, copy=True),
                    finish_reason=_FINISH_NAMES[codes[b]],
                    stop_reason=stops[b] if stops[b] >= 0 else None,
                    routed_experts=routed,
                    weight_versions=spans.for_length(m),
                    top_logprobs=top,
                )
            )
        results.append(PromptOutput(prompt_token_ids=list(prompt), samples=samples))
    return results

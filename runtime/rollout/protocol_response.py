"""Response side of the rollout wire protocol: vLLM's ``CompletionResponse`` /
``CompletionResponseChoice`` / ``CompletionLogProbs`` / ``UsageInfo`` subset as
dataclasses with ``to_json`` (the server) and lenient ``from_json`` (the client),
the per-choice ``weight_versions`` spans (``WeightVersionSpan``,
``parse_weight_versions``), the ``"token_id:N"`` token spelling, and
``choices_by_prompt``. The field-by-field description is in the docstring of
``runtime.rollout.protocol``, which re-exports every name here."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.rollout.protocol_errors import ProtocolError

__all__ = [
    "CompletionChoice",
    "CompletionLogProbs",
    "CompletionResponse",
    "Usage",
    "WeightVersionSpan",
    "choices_by_prompt",
    "parse_token_id_string",
    "parse_weight_versions",
    "prompt_logprob_entries",
    "token_id_string",
]


@dataclass(frozen=True)
class WeightVersionSpan:
    """Output tokens [start, end) were sampled with weights ``weight_version``."""

    weight_version: str
    start: int
    end: int

    def to_json(self) -> dict[str, Any]:
        return {"weight_version": self.weight_version, "start": self.start, "end": self.end}


def parse_weight_versions(raw: object, num_tokens: int) -> tuple[WeightVersionSpan, ...]:
    """Read a choice's ``weight_versions`` leniently (see the module docstring): span
    dicts (``weight_version`` or ``version`` key), a list of version strings (one per
    span, split unknown → the whole output) or one string. ``()`` when absent."""
    if raw is None:
        return ()
    if isinstance(raw, str | int):
        return (WeightVersionSpan(str(raw), 0, num_tokens),)
    if not isinstance(raw, list):
        raise ProtocolError(f"unreadable weight_versions {raw!r}", param="weight_versions")
    spans: list[WeightVersionSpan] = []
    for item in raw:
        if isinstance(item, dict):
            version = item.get("weight_version", item.get("version"))
            if version is None:
                raise ProtocolError(f"weight_versions span without a version: {item!r}")
            start = item.get("start", 0)
            end = item.get("end", num_tokens)
            spans.append(WeightVersionSpan(str(version), int(start), int(end)))
        else:
            spans.append(WeightVersionSpan(str(item), 0, num_tokens))
    return tuple(spans)


def token_id_string(token_id: int) -> str:
    """vLLM's ``return_tokens_as_token_ids`` spelling of a token."""
    return f"token_id:{token_id}"


def parse_token_id_string(s: str) -> int:
    if not s.startswith("token_id:"):
        raise ProtocolError(f"token {s!r} is not of the form 'token_id:N'")
    return int(s[len("token_id:") :])


@dataclass(frozen=True)
class CompletionLogProbs:
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    def to_json(self) -> dict[str, Any]:
        return {
            "text_offset": self.text_offset,
            "token_logprobs": self.token_logprobs,
            "tokens": self.tokens,
            "top_logprobs": self.top_logprobs,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CompletionLogProbs:
        return cls(
            tokens=list(d.get("tokens") or []),
            token_logprobs=list(d.get("token_logprobs") or []),
            top_logprobs=list(d.get("top_logprobs") or []),
            text_offset=list(d.get("text_offset") or []),
        )


@dataclass(frozen=True)
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogProbs | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    routed_experts: str | None = None
    weight_versions: list[WeightVersionSpan] | None = None
    # vLLM's per prompt token entry: None for the first, else {"<token id>": {"logprob",
    # "rank", "decoded_token"}} (the prompt token, then its top-k alternatives when asked)
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None

    def prompt_token_logprobs(self) -> list[float]:
        """log p(x_t | x_<t) of the prompt tokens after the first (``prompt_token_ids`` order)."""
        if self.prompt_logprobs is None or self.prompt_token_ids is None:
            raise ValueError("the choice carries no prompt_logprobs / prompt_token_ids")
        ids, entries = self.prompt_token_ids, self.prompt_logprobs
        if len(entries) != len(ids):
            raise ValueError(f"{len(entries)} prompt_logprobs entries for {len(ids)} tokens")
        return [float(e[str(t)]["logprob"]) for t, e in zip(ids[1:], entries[1:], strict=True)
                if e is not None]

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "index": self.index,
            "text": self.text,
            "logprobs": None if self.logprobs is None else self.logprobs.to_json(),
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "token_ids": self.token_ids,
            "prompt_logprobs": self.prompt_logprobs,
            "prompt_token_ids": self.prompt_token_ids,
            "routed_experts": self.routed_experts,
        }
        if self.weight_versions is not None:
            body["weight_versions"] = [s.to_json() for s in self.weight_versions]
        return body

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CompletionChoice:
        lp = d.get("logprobs")
        token_ids = d.get("token_ids")
        n_out = len(token_ids) if isinstance(token_ids, list) else 0
        raw_versions = d.get("weight_versions")
        return cls(
            index=int(d["index"]),
            text=str(d.get("text") or ""),
            finish_reason=d.get("finish_reason"),
            logprobs=None if lp is None else CompletionLogProbs.from_json(lp),
            stop_reason=d.get("stop_reason"),
            token_ids=None if token_ids is None else [int(t) for t in token_ids],
            prompt_token_ids=(
                None
                if d.get("prompt_token_ids") is None
                else [int(t) for t in d["prompt_token_ids"]]
            ),
            routed_experts=d.get("routed_experts"),
            prompt_logprobs=d.get("prompt_logprobs"),
            weight_versions=(
                None if raw_versions is None else list(parse_weight_versions(raw_versions, n_out))
            ),
        )


def prompt_logprob_entries(ids: Sequence[int], logprobs: Sequence[tuple[float, int]],
                           token_text: Callable[[int], str]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs`` of a choice: None for the first token, then each token's
    own {"<id>": {"logprob", "rank", "decoded_token"}}."""
    return [None, *({str(t): {"logprob": lp, "rank": rank, "decoded_token": token_text(t)}}
                    for t, (lp, rank) in zip(ids[1:], logprobs, strict=True))]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.total_tokens,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens_details": None,
        }


@dataclass(frozen=True)
class CompletionResponse:
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [c.to_json() for c in self.choices],
            "usage": self.usage.to_json(),
        }

    @classmethod
    def from_json(cls, d: object) -> CompletionResponse:
        if not isinstance(d, dict) or not isinstance(d.get("choices"), list):
            raise ProtocolError(f"not a completion response: {str(d)[:200]}")
        usage = d.get("usage") or {}
        return cls(
            model=str(d.get("model", "")),
            choices=[CompletionChoice.from_json(c) for c in d["choices"]],
            usage=Usage(
                int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens") or 0)
            ),
            id=str(d.get("id", "")),
            created=int(d.get("created", 0)),
        )


def choices_by_prompt(
    choices: Sequence[CompletionChoice], num_prompts: int, n: int
) -> list[list[CompletionChoice]]:
    """Group choices by prompt using ``index = prompt · n + sample`` (vLLM's order)."""
    out: list[list[CompletionChoice | None]] = [[None] * n for _ in range(num_prompts)]
    for c in choices:
        p, j = divmod(c.index, n)
        if not 0 <= p < num_prompts:
            raise ProtocolError(f"choice index {c.index} out of range for {num_prompts}×{n}")
        out[p][j] = c
    missing = [(p, j) for p in range(num_prompts) for j in range(n) if out[p][j] is None]
    if missing:
        raise ProtocolError(f"response lacks choices for (prompt, sample) {missing[:5]}")
    return [[c for c in row if c is not None] for row in out]

"""Wire protocol of the rollout service: the subset of vLLM's HTTP API the RL runtime uses.

The embedded server (``runtime.rollout.server``) and the client
(``runtime.rollout.client``) share these dataclasses, so the client talks to our
server and to ``vllm serve`` (0.33, started with ``VLLM_SERVER_DEV_MODE=1`` for the
RL endpoints and ``--enable-return-routed-experts`` for R3) with the same code.
Every field below exists in vLLM; the file it comes from is named. Sources read:
vllm-project/vllm at the newest stored revisions of the files named (the
``completion/`` package layout of vLLM ≥ 0.2x; older trees kept the same classes in
``vllm/entrypoints/openai/protocol.py``).

POST /v1/completions — ``CompletionRequest``
(``vllm/entrypoints/openai/completion/protocol.py``, class ``CompletionRequest``):

=============================== ==================================================
field                           handling here
=============================== ==================================================
``model``                       optional; must equal the served name (else 404)
``prompt``                      token ids only: ``list[int]`` or ``list[list[int]]``
                                (ids ≥ 0, non-empty); text prompts are refused (400)
``n``                           ≥ 1; sample j of a seeded request uses seed + j
                                (``vllm/v1/engine/parallel_sampling.py``)
``max_tokens``                  ≥ 1, null → 16 (vLLM's default); capped at
                                max_model_len − prompt_len as ``get_max_tokens`` does
``temperature``                 ≥ 0, null → 1.0; < 1e-5 is greedy (vLLM sampler)
``top_p``                       (0, 1], null → 1.0
``top_k``                       0 or −1 = off, else ≥ 1
``seed``                        int or null
``logprobs``                    null or 0..20 (vLLM's ``max_logprobs`` default 20)
``prompt_logprobs``             null or 0: each prompt token's log-prob given the tokens
                                before it (the weight-sync probe, ``runtime.sync_check``);
                                vLLM's top-k alternatives (> 0) are refused
``stop_token_ids``              list of ints; the stop token is kept in the output
                                and reported as ``stop_reason`` (vLLM ``check_stop``,
                                ``vllm/v1/core/sched/utils.py``)
``ignore_eos``                  bool
``return_token_ids``            bool: adds ``token_ids`` / ``prompt_token_ids``
``return_tokens_as_token_ids``  bool: logprob tokens as ``"token_id:N"``
``routed_experts_prompt_start`` int ≥ 0: skip that many leading prompt rows of
                                ``routed_experts``
``request_id``                  optional; the response id is ``cmpl-<request_id>``
=============================== ==================================================

Fields refused with 400 when set to a non-default value (vLLM supports them, we do
not): ``stream``, ``echo``, ``use_beam_search``, ``stop`` (strings),
``min_tokens``, ``min_p``, ``presence_penalty``, ``frequency_penalty``,
``repetition_penalty``, ``logit_bias``, ``allowed_token_ids``, ``bad_words``,
``prompt_logprobs`` > 0, ``logprob_token_ids``, ``prompt_embeds``, ``suffix``.
Other unknown fields are ignored, as vLLM's ``OpenAIBaseModel`` does.

Response — ``CompletionResponse`` / ``CompletionResponseChoice`` / ``CompletionLogProbs``
(same file): ``id``, ``object="text_completion"``, ``created``, ``model``, ``choices``,
``usage`` {``prompt_tokens``, ``completion_tokens``, ``total_tokens``}
(``UsageInfo``, ``vllm/entrypoints/serve/engine/protocol.py``). A choice carries
``index`` (= prompt_index · n + sample_index, the order of
``request_output_to_completion_response`` in ``completion/serving.py``), ``text``,
``logprobs`` {``tokens``, ``token_logprobs`` (clamped at −9999.0 as vLLM does),
``top_logprobs``, ``text_offset``}, ``finish_reason`` ("stop" | "length" | "abort"),
``stop_reason`` (the stop token id, null for EOS / length), ``token_ids``,
``prompt_token_ids`` and ``routed_experts``: base64 of ``.npy`` bytes, shape
(num_tokens − 1 − routed_experts_prompt_start, moe_layers, top_k) over prompt +
output tokens, uint8 for ≤ 256 experts (``numpy2base64`` of the engine's array).

``weight_versions`` on a choice: vLLM 0.33 carries the weight version that sampled each
output-token span when the request sets ``return_weight_versions: true`` (which the client
always does), as ``{"version": str, "start": int, "end": int}`` spans; 0.30 has no such
field. Our server emits them always, as ``{"weight_version": str, "start": int, "end":
int}`` spans over the output tokens (end exclusive); the client reads either key, a list of
strings, or a plain string, and falls back to ``GET /weight_info`` taken just before the
request when the server sends nothing.

RL endpoints (``vllm/entrypoints/serve/dev/rlhf/api_router.py``; in the pinned 0.33.0
``vllm/entrypoints/rl/online/api_router.py``; mounted only with ``VLLM_SERVER_DEV_MODE=1``).
The weight-transfer ones (``/init_weight_transfer_engine``, ``/get_world_size``, the
``/update_weights`` bodies of NCCL / IPC, ``/collective_rpc reload_weights``) are described
in ``runtime.rollout.weight_transfer``:

* ``POST /pause?mode=abort|wait|keep`` → ``{"status": "paused"}``. abort (default)
  finishes in-flight requests with ``finish_reason="abort"``, wait lets them finish,
  keep freezes them until resume. New requests wait until ``/resume`` (vLLM 0.30, and
  our server; vLLM 0.33 instead refuses them with a retryable 503 after abort and wait, so
  the driver never generates while it pushes weights).
  A bad mode → 400 with ``param="query.mode"``.
* ``POST /resume`` → ``{"status": "resumed"}``; ``GET /is_paused`` → ``{"is_paused": bool}``.
* ``POST /start_weight_update`` (body ``{"is_checkpoint_format": bool}``, ignored: vLLM
  takes none) → ``{"message": "Weight update started"}``; our server answers 409 when one
  is already active, vLLM 0.33 a 500 from its workers.
* ``POST /update_weights`` body ``{"update_info": {...}}`` → ``{"message":
  "Weights updated"}``; 400 without ``update_info``, 409 without a started update.
  vLLM hands ``update_info`` to its NCCL / IPC transfer backend
  (``--weight-transfer-config``); we do not implement those transfers. Our backend
  reads ``update_info = {"path": <safetensors file or checkpoint directory>,
  "weight_version": <optional str>}`` from disk.
* ``POST /finish_weight_update`` body ``{"weight_version": str | null}`` →
  ``{"message": "Weight update finished"}``: the version is published only here
  (vllm-project/vllm#49040), else the one staged in ``update_info``, else unchanged.
* ``POST /update_weight_version`` body ``{"new_version": str}`` →
  ``{"success": true, "new_version": ...}``; 400 with ``param="body.new_version"``.
* ``GET /weight_info`` → ``{"weight_version": str}``; a fresh engine reports "default".

Errors: ``{"error": {"message", "type", "param", "code"}}`` with ``code`` = the HTTP
status (``ErrorInfo`` / ``ErrorResponse``, ``vllm/entrypoints/serve/engine/protocol.py``);
``type`` is "BadRequestError" (400), "NotFoundError" (404), "ConflictError" (409),
"InternalServerError" (500), as vLLM's exception handlers name them.
Also ``GET /health`` (200, empty body) and ``GET /v1/models`` (``ModelList`` of
``ModelCard`` with ``max_model_len``).

This module holds the request side (``CompletionRequest`` and its strict field
readers) and the protocol constants; the response dataclasses live in
``runtime.rollout.protocol_response`` and the errors in
``runtime.rollout.protocol_errors``. Every name of both is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from runtime.rollout.protocol_errors import ProtocolError, error_body
from runtime.rollout.protocol_response import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionResponse,
    Usage,
    WeightVersionSpan,
    choices_by_prompt,
    parse_token_id_string,
    parse_weight_versions,
    token_id_string,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "LOGPROB_FLOOR",
    "MAX_LOGPROBS",
    "PAUSE_MODES",
    "CompletionChoice",
    "CompletionLogProbs",
    "CompletionRequest",
    "CompletionResponse",
    "PauseMode",
    "ProtocolError",
    "Usage",
    "WeightVersionSpan",
    "choices_by_prompt",
    "error_body",
    "parse_token_id_string",
    "parse_weight_versions",
    "token_id_string",
]

# vLLM's CompletionRequest.max_tokens default (also used when the client sends null).
DEFAULT_MAX_TOKENS = 16
# vLLM ModelConfig.max_logprobs default.
MAX_LOGPROBS = 20
# vLLM clamps -inf logprobs to this JSON-safe value (completion/serving.py).
LOGPROB_FLOOR = -9999.0

PauseMode = Literal["abort", "wait", "keep"]
PAUSE_MODES: tuple[str, ...] = ("abort", "wait", "keep")


# --------------------------------------------------------------------------------------
# strict JSON field readers (JSON has no int/bool distinction problems, Python does:
# True is an int, so every int check excludes bool explicitly)
# --------------------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool) and math.isfinite(v)


def _get_int(
    d: Mapping[str, Any], key: str, default: int | None, *, lo: int | None = None
) -> int | None:
    v = d.get(key, default)
    if v is None:
        return default
    if not _is_int(v):
        raise ProtocolError(f"`{key}` must be an integer, got {v!r}", param=key)
    if lo is not None and v < lo:
        raise ProtocolError(f"`{key}` must be ≥ {lo}, got {v}", param=key)
    return int(v)


def _get_float(d: Mapping[str, Any], key: str, default: float) -> float:
    v = d.get(key)
    if v is None:
        return default
    if not _is_number(v):
        raise ProtocolError(f"`{key}` must be a finite number, got {v!r}", param=key)
    return float(v)


def _get_bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ProtocolError(f"`{key}` must be a boolean, got {v!r}", param=key)
    return v


def _token_list(v: object, *, param: str) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        raise ProtocolError(f"`{param}` must be a list of integer token ids", param=param)
    if any(t < 0 for t in v):
        raise ProtocolError(f"`{param}` token ids must be ≥ 0", param=param)
    return [int(t) for t in v]


# Fields vLLM accepts that this server does not implement, with their neutral values:
# a request setting any of them to something else is refused rather than silently
# sampled differently from what the caller asked.
_UNSUPPORTED_NEUTRAL: dict[str, tuple[object, ...]] = {
    "stream": (False, None),
    "echo": (False, None),
    "use_beam_search": (False, None),
    "stop": (None, [], ""),
    "min_tokens": (0, None),
    "min_p": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "repetition_penalty": (1, 1.0, None),
    "logit_bias": (None, {}),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "prompt_logprobs": (None, 0),  # 0 is implemented (module doc)
    "logprob_token_ids": (None,),
    "prompt_embeds": (None,),
    "suffix": (None, ""),
}


@dataclass(frozen=True)
class CompletionRequest:
    """The implemented subset of vLLM's ``CompletionRequest`` (prompts normalised to
    ``list[list[int]]``)."""

    prompt: list[list[int]]
    model: str | None = None
    n: int = 1
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    routed_experts_prompt_start: int = 0
    request_id: str | None = None

    @classmethod
    def from_json(cls, d: object) -> CompletionRequest:
        """Validate a decoded JSON body; raises ``ProtocolError`` (400) with ``param``."""
        if not isinstance(d, dict):
            raise ProtocolError("request body must be a JSON object", param="body")
        for key, neutral in _UNSUPPORTED_NEUTRAL.items():
            if key in d and d[key] is not None and d[key] not in neutral:
                raise ProtocolError(
                    f"`{key}` is not supported by this rollout server (got {d[key]!r})", param=key
                )
        raw = d.get("prompt")
        if raw is None or raw == [] or raw == "":
            raise ProtocolError("`prompt` must be provided and non-empty", param="prompt")
        if isinstance(raw, str) or (isinstance(raw, list) and any(isinstance(p, str) for p in raw)):
            raise ProtocolError(
                "text prompts are not supported by this rollout server; send token ids",
                param="prompt",
            )
        if isinstance(raw, list) and all(_is_int(t) for t in raw):
            prompts = [_token_list(raw, param="prompt")]
        elif isinstance(raw, list) and all(isinstance(p, list) for p in raw):
            prompts = [_token_list(p, param="prompt") for p in raw]
            if any(len(p) == 0 for p in prompts):
                raise ProtocolError("every prompt must contain at least one token", param="prompt")
        else:
            raise ProtocolError(
                "`prompt` must be a list of token ids or a list of such lists", param="prompt"
            )

        model = d.get("model")
        if model is not None and not isinstance(model, str):
            raise ProtocolError("`model` must be a string", param="model")
        request_id = d.get("request_id")
        if request_id is not None and not isinstance(request_id, str):
            raise ProtocolError("`request_id` must be a string", param="request_id")

        n = _get_int(d, "n", 1, lo=1)
        max_tokens = _get_int(d, "max_tokens", DEFAULT_MAX_TOKENS, lo=1)
        temperature = _get_float(d, "temperature", 1.0)
        if temperature < 0:
            raise ProtocolError(
                f"`temperature` must be ≥ 0, got {temperature}", param="temperature"
            )
        top_p = _get_float(d, "top_p", 1.0)
        if not 0 < top_p <= 1:
            raise ProtocolError(f"`top_p` must be in (0, 1], got {top_p}", param="top_p")
        top_k = _get_int(d, "top_k", 0)
        assert top_k is not None
        if top_k < -1:
            raise ProtocolError(
                f"`top_k` must be 0 or -1 (disabled) or at least 1, got {top_k}", param="top_k"
            )
        seed = _get_int(d, "seed", None)
        if seed is not None and not -(2**63) <= seed < 2**63:
            raise ProtocolError("`seed` must fit a signed 64-bit integer", param="seed")
        logprobs = _get_int(d, "logprobs", None)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ProtocolError(
                f"Requested sample logprobs of {logprobs}, which is outside the allowed "
                f"range [0, {MAX_LOGPROBS}]",
                param="logprobs",
            )
        stop_ids = d.get("stop_token_ids")
        stop_token_ids = [] if stop_ids is None else _token_list(stop_ids, param="stop_token_ids")
        start = _get_int(d, "routed_experts_prompt_start", 0, lo=0)
        assert n is not None and max_tokens is not None and start is not None
        for p in prompts:
            if start >= len(p):
                raise ProtocolError(
                    f"`routed_experts_prompt_start` ({start}) must be smaller than the prompt "
                    f"length ({len(p)})",
                    param="routed_experts_prompt_start",
                )
        return cls(
            prompt=prompts,
            model=model,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=0 if top_k == -1 else top_k,
            seed=seed,
            logprobs=logprobs,
            prompt_logprobs=_get_int(d, "prompt_logprobs", None),
            stop_token_ids=stop_token_ids,
            ignore_eos=_get_bool(d, "ignore_eos", False),
            return_token_ids=_get_bool(d, "return_token_ids", False),
            return_tokens_as_token_ids=_get_bool(d, "return_tokens_as_token_ids", False),
            routed_experts_prompt_start=start,
            request_id=request_id,
        )

    def to_json(self) -> dict[str, Any]:
        """The request body a client sends (to our server or to ``vllm serve``)."""
        body: dict[str, Any] = {
            # Always the list-of-lists form: one prompt of ids is unambiguous either way.
            "prompt": [list(p) for p in self.prompt],
            "n": self.n,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "ignore_eos": self.ignore_eos,
            "return_token_ids": self.return_token_ids,
            "return_tokens_as_token_ids": self.return_tokens_as_token_ids,
        }
        if self.model is not None:
            body["model"] = self.model
        if self.seed is not None:
            body["seed"] = self.seed
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        if self.prompt_logprobs is not None:
            body["prompt_logprobs"] = self.prompt_logprobs
        if self.stop_token_ids:
            body["stop_token_ids"] = list(self.stop_token_ids)
        # vLLM 0.33 stamps each choice's weight_versions only when asked (older vLLMs and the
        # embedded server, which always stamps, ignore the field).
        body["return_weight_versions"] = True
        # Sent only when used: it is the one field an older vLLM would ignore silently.
        if self.routed_experts_prompt_start:
            body["routed_experts_prompt_start"] = self.routed_experts_prompt_start
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return body

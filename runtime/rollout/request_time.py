"""How long one completion request may run before the client gives up on its endpoint.

A non-streaming ``/v1/completions`` answers only when its last sequence ends, so a fixed
limit either kills healthy long generations (a 32k-token reasoning answer decodes for tens
of minutes) or waits hours on a hung engine. The limit therefore covers the work the request
asks for, at a decode speed no healthy engine falls below, plus a fixed allowance::

    limit  = base + waves · max_tokens / DECODE_FLOOR_TOKENS_PER_S
    waves  = ⌈ (sequences in flight on the endpoint, this request's included) / max_num_seqs ⌉

``base`` (the job's ``RLSPEC_ROLLOUT_TIMEOUT``, 600 s) covers admission, prefill and a busy
engine's queue; ``max_num_seqs`` is what the engine runs at once (``rollout.max_num_seqs``,
vLLM's ``--max-num-seqs``, or fewer where its KV cache holds fewer full-length sequences:
``JobContext.engine_concurrency``), so the sequences in flight beyond it wait for whole
waves of generations to end. An engine that decodes more slowly than the floor, per sequence,
is treated as hung: its request is retried elsewhere (``runtime.rollout.client``).
"""

from __future__ import annotations

import math

__all__ = ["DECODE_FLOOR_TOKENS_PER_S", "request_limit_s"]

#: Tokens per second per sequence below which an engine counts as hung. A large MoE under a
#: full batch decodes at tens of tokens/s per sequence; 5 leaves a wide margin.
DECODE_FLOOR_TOKENS_PER_S = 5.0


def request_limit_s(base_s: float, max_tokens: int, in_flight: int, max_num_seqs: int,
                    floor: float = DECODE_FLOOR_TOKENS_PER_S) -> float:
    """The module's ``limit`` for a request of up to ``max_tokens`` new tokens per sequence,
    sent to an endpoint that then holds ``in_flight`` sequences (this request's included)."""
    if base_s <= 0 or max_num_seqs < 1 or floor <= 0:
        raise ValueError("base_s > 0, max_num_seqs ≥ 1 and floor > 0 required")
    waves = max(1, math.ceil(max(0, in_flight) / max_num_seqs))
    return base_s + waves * max(0, int(max_tokens)) / floor

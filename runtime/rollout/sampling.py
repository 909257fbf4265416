"""Token sampling for the embedded engine: vLLM's sampler over counter-based uniforms.

Sampling follows vLLM's sampler (``vllm/v1/sample/sampler.py``): temperature <
1e-5 is greedy; otherwise logits / T, then top-k, then top-p (vLLM's
``apply_top_k_top_p``: ascending sort, mask cumulative mass ≤ 1 − p, always keep
the top token), then a draw from the renormalised distribution.

Randomness. Each sequence has a 64-bit key: ``seed + j`` for sample j of a seeded
request (vLLM's ``ParentRequest`` gives child j the seed ``seed + j``), or a draw
from the engine's own generator (seeded with ``seed``) otherwise. The uniform for
step t is a counter-based hash of (key, t), and the token is the inverse-CDF draw
at that uniform. So a sequence's sample depends only on its key, its step and its
logits — not on which other sequences share the batch — and a seeded request is
reproducible whether it is sent alone, batched, or split across replicas.

Logprobs (``logprobs_mode``, vLLM's ``--logprobs-mode``, default ``raw_logprobs``):
``raw_logprobs`` = log_softmax of the model's raw logits (temperature 1, before
top-k/top-p), which is vLLM's default and what the trainer recomputes;
``processed_logprobs`` = log-probabilities under the distribution actually sampled
from (after temperature, top-k, top-p), i.e. the behaviour policy μ. They coincide
at temperature 1 without top-k/top-p. For train–inference correction with T ≠ 1 or
truncated sampling, run the engine with ``processed_logprobs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["LogprobsMode", "sample_tokens"]

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]

# vLLM treats temperatures below this as greedy (vllm/v1/sample/sampler.py).
_GREEDY_EPS = 1e-5
_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# counter-based uniforms
# --------------------------------------------------------------------------------------


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser on int64 tensors holding values in [0, 2^32).

    Multipliers are below 2^31, so every product stays below 2^63: no signed
    overflow (whose wrap-around torch does not promise)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x346CA68B) & _M32
    return x ^ (x >> 16)


def _sequence_keys(seeds: Sequence[int]) -> torch.Tensor:
    """Fold 64-bit seeds (any Python int) into 32-bit hash keys, int64 [B]."""
    s = [int(v) % (1 << 64) for v in seeds]
    lo = torch.tensor([v & _M32 for v in s], dtype=torch.int64)
    hi = torch.tensor([v >> 32 for v in s], dtype=torch.int64)
    return _mix32(lo ^ _mix32(hi ^ 0x1B873593))


def _uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """float64 uniforms in (0, 1), one per key, for decode step ``step``: 53 bits
    from two hash words of (key, step)."""
    s = _mix32(torch.tensor([(step * 0x9E3779B1) & _M32], dtype=torch.int64, device=keys.device))
    h1 = _mix32(keys ^ s)
    h2 = _mix32(h1 ^ 0x27D4EB2F)
    bits = (h1 << 21) | (h2 >> 11)
    return (bits.to(torch.float64) + 0.5) * (2.0**-53)


# --------------------------------------------------------------------------------------
# vLLM's sampler
# --------------------------------------------------------------------------------------


def sample_tokens(
    logits: torch.Tensor,
    keys: torch.Tensor,
    step: int,
    greedy: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    num_logprobs: int | None,
    logprobs_mode: LogprobsMode,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Draw one token per row; returns (tokens [R], logprobs [R], top-k logprobs)."""
    raw = torch.log_softmax(logits, dim=-1)
    processed = logits if greedy else logits / temperature
    vocab = processed.shape[-1]
    use_k = 0 < top_k < vocab
    if use_k or top_p < 1.0:
        # vLLM's apply_top_k_top_p: one ascending sort serves both filters.
        srt, order = processed.sort(dim=-1)
        if use_k:
            kth = srt[:, vocab - top_k : vocab - top_k + 1]
            srt = srt.masked_fill(srt < kth, float("-inf"))
        if top_p < 1.0:
            cum = srt.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= 1.0 - top_p
            drop[:, -1] = False
            srt = srt.masked_fill(drop, float("-inf"))
        processed = srt.scatter(-1, order, srt)
    if greedy:
        tok = processed.argmax(dim=-1)
    else:
        cdf = torch.softmax(processed.double(), dim=-1).cumsum(dim=-1)
        u = _uniforms(keys, step)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        tok = tok.clamp_max(vocab - 1)
    table = (
        raw if logprobs_mode == "raw_logprobs" else torch.log_softmax(processed, dim=-1)
    )
    lp = table.gather(1, tok[:, None]).squeeze(1)
    top = None
    if num_logprobs:
        vals, idx = table.topk(num_logprobs, dim=-1)
        top = (idx, vals)
    return tok, lp, top


def prompt_logprobs_of(model: torch.nn.Module, prompt: Sequence[int],
                       device: torch.device) -> list[tuple[float, int]]:
    """(log p(x_t | x_<t), rank) of every prompt token after the first (vLLM's
    ``prompt_logprobs=0``): one uncached forward over the prompt, in the precision the
    engine samples with. The rank counts the tokens at least as likely, itself included, as
    vLLM's does."""
    ids = torch.tensor([list(prompt)], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    chosen = logits.gather(1, ids[0, 1:, None])
    logp = chosen[:, 0] - torch.logsumexp(logits, dim=-1)
    ranks = (logits >= chosen).sum(dim=1)
    return list(zip(logp.tolist(), ranks.tolist(), strict=True))

r"""The seeds of the RL run's sampling requests, all derived here from ``train.seed``.

Every generation request the RL driver sends (rollouts, in-run evaluation) carries a seed::

    request_seed(run_seed, purpose, step, key) =
        int.from_bytes(blake2b(repr((run_seed, purpose, step, key)), 8 bytes)) mod 2^62

``purpose`` names the request kind (``"rollout"``, ``"eval"``), ``step`` is the RL step and
``key`` identifies what is sampled: for rollouts the sampling round of the step, the
request's prompt ids (their JSON values, in request order) and n. Sample j of a seeded
request uses ``seed + j`` (vLLM's ``ParentRequest``; ``runtime.rollout.sampling``), so the
seed stays below 2^62 to leave ``seed + j`` inside the signed 64-bit range both engines
accept.

What follows from it: the same spec and ``train.seed`` sample the same rollouts, step by
step (the driver's prompt selection, the pipeline's RNG and the trainer are seeded from the
same spec); a resumed run re-samples the interrupted step's rollouts exactly (its step and
prompts come from the saved driver state, its weights from ``weights/v<s>``); another
``train.seed`` samples other rollouts. ``blake2b`` of ``repr`` is stable across processes
and Python versions, unlike ``hash()``, which is salted per process.

The prompts of one request share one random stream (sample j of every prompt uses the keys
of ``seed + j``), as in vLLM, where a request's prompts all get the request's seed: the
driver sends one request per chunk of prompts rather than one per prompt, which would cost
the embedded engine its batching (about 10× the generation time of the tiny run). The
samples of one prompt are independent of each other, and every step and chunk gets its own
stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable

__all__ = ["SEED_BITS", "request_seed"]

SEED_BITS = 62


def request_seed(run_seed: int, purpose: str, step: int, key: Hashable = ()) -> int:
    """The seed of one generation request (module doc); in [0, 2^62)."""
    text = repr((int(run_seed), str(purpose), int(step), key)).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big") % (1 << SEED_BITS)

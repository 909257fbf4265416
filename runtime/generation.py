r"""One step's rollouts: prompts → seeded requests to the engine replicas → decoded, scored groups.

The step's prompt groups go to the engine replicas (the client's endpoints) by predicted work
when ``system.length_balancing`` is true: each group's work is n × its prompt's predicted
generation length (``runtime.rollout.length_predictor``: the mean length of the prompt's last
group in this run, else the mean over all completions so far, else ``rollout.max_tokens`` / 2)
+ its prompt's length, and the groups are assigned longest first to the least-loaded replica
(``runtime.rollout.balance``); each replica then gets its groups as one request per group
size (two with ``reward_overlap``). Off: the client spreads every request's prompts
round-robin. With ``system.reward_overlap`` each chunk of prompts is scored as soon as its
completions arrive while the others still generate. Either way the client reports every
request's start and finish, and ``stats`` gets each replica's busy time (the union of its
requests' spans, ``runtime.rollout.replica_time``) and the generation's wall time.

Decoding and scoring: in the driver's thread (``system.reward_workers`` = 1), or, given a
``scorer`` (``runtime.scoring.ScoringPool``, W > 1 workers), each group is submitted to the
pool as soon as its chunk returns and the results are collected, in the groups' order, once
every chunk has been submitted; the version check, the token counts and the length history
stay in the driver's thread, in the order the chunks return, as with W = 1.

Every request carries a seed derived from ``train.seed``, the step, the sampling round and
the request's prompts (``runtime.seeds``), so a step re-sampled after a restart gets the same
rollouts. Every completion carries the weights version that sampled it when the engine
reports one (``weight_versions``); it must be the version the driver loaded (``expect``),
else the weight sync did not take effect and the step stops.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from typing import Any

import numpy as np

from runtime.errors import JobError

__all__ = ["Generation", "engine_version"]


def engine_version(label: str | None) -> int | None:
    """The step count of an engine's ``weight_version`` label: the driver pushes ``str(k)``
    for ``v<k>``; a fresh engine reports vLLM's "default" (the starting policy, 0)."""
    if label is None or label == "":
        return None
    if label == "default":
        return 0
    return int(label) if label.isdigit() else None


class Generation:
    """Samples, decodes and scores prompt groups through ``client`` (module doc)."""

    def __init__(self, spec: dict[str, Any], rows: dict[Any, dict[str, Any]],
                 client: Any, scorer: Any = None) -> None:
        self.spec = spec
        self.scorer = scorer  # a runtime.scoring.ScoringPool, or None: the driver's thread
        self.rows = rows
        self.client = client
        self.rollout = spec["rollout"]
        self.prompt_key = spec["data"]["prompt_key"]
        self.answer_key = spec["data"]["answer_key"]
        self.run_seed = int(spec["train"]["seed"])
        self.overlap = bool(spec["system"]["reward_overlap"])
        self.balance = bool(spec["system"]["length_balancing"])
        self.want_routes = spec["router_replay"]["mode"] == "r3"

    def chunks(self, requests: list[Any], encoded: dict[Any, list[int]],
                lengths: Any) -> list[tuple[int | None, list[int]]]:
        """The requests (indices) of each ``client.generate`` call, with the replica it goes
        to (None: the client's round-robin): of equal n, several per replica when rewards
        overlap generation; by predicted work with ``system.length_balancing`` (module doc)."""
        from runtime.rollout.balance import lpt_assign

        replicas = len(self.client.endpoints)
        if self.balance:
            work = [r.n * lengths.predict(r.prompt_id) + len(encoded[r.prompt_id])
                    for r in requests]
            owner = lpt_assign(work, replicas)
            parts = 2 if self.overlap else 1
            keys = [(owner[i], r.n) for i, r in enumerate(requests)]
        else:
            parts = max(1, 2 * replicas) if self.overlap else 1
            keys = [(None, r.n) for r in requests]
        by_key: dict[tuple[int | None, int], list[int]] = {}
        for i, key in enumerate(keys):
            by_key.setdefault(key, []).append(i)
        chunks: list[tuple[int | None, list[int]]] = []
        for (replica, _), idx in by_key.items():
            size = max(1, math.ceil(len(idx) / parts))
            chunks += [(replica, idx[k : k + size]) for k in range(0, len(idx), size)]
        return chunks

    def groups(self, requests: list[Any], tokenizer: Any, reward: Any,
                  stats: dict[str, Any], lengths: Any, step: int = 0,
                  round_: int = 0, expect: int | None = None) -> list[Any]:
        """One group per request: sampled, decoded and scored; each group's lengths go to the
        predictor, each replica's busy time and the generation's wall time to ``stats``. Each
        chunk of prompts is one seeded request (``runtime.seeds``: ``train.seed``, step,
        sampling round of the step, the chunk's prompt ids and n). ``expect``: the weights
        version the engines hold, checked against every completion that reports one."""
        from runtime.filters import Group
        from runtime.rollout.replica_time import RequestLog
        from runtime.seeds import request_seed

        sampling = dict(self.rollout["sampling"])
        sampling["max_tokens"] = int(self.rollout["max_tokens"])
        encoded = {}
        for r in requests:
            if r.prompt_id not in encoded:
                text = str(self.rows[r.prompt_id][self.prompt_key])
                encoded[r.prompt_id] = tokenizer.encode(text, add_special_tokens=False)
        chunks = self.chunks(requests, encoded, lengths)
        log = RequestLog()
        groups: list[Any] = [None] * len(requests)
        received: dict[int, list[Any]] = {}  # request → its completions
        submitted: dict[int, Any] = {}  # request → its scoring future (with a scorer)

        def group(i: int, got: Any) -> Any:
            comps, pid = received[i], requests[i].prompt_id
            return Group(pid, got.rewards, lengths=[len(c.token_ids) for c in comps],
                         token_ids=[c.token_ids for c in comps], scores=got.scores,
                         payload=(encoded[pid], comps))

        def score(chunk: list[int], completions: list[list[Any]]) -> None:
            for i, comps in zip(chunk, completions, strict=True):
                req = requests[i]
                if expect is not None:
                    self._check_version(comps, expect, step)
                received[i] = comps
                sizes = [len(c.token_ids) for c in comps]
                stats["tokens"] += sum(sizes)
                lengths.observe(req.prompt_id, sizes)
                row = self.rows[req.prompt_id]
                if self.scorer is not None:  # decoded and scored in a worker
                    submitted[i] = self._submit(row, comps)
                else:
                    groups[i] = group(i, self._score(row, comps, tokenizer, reward))

        def gen(replica: int | None, chunk: list[int]) -> list[list[Any]]:
            prompts = [encoded[requests[i].prompt_id] for i in chunk]
            n = requests[chunk[0]].n
            key = (round_, tuple(requests[i].prompt_id for i in chunk), n)
            seeded = {**sampling, "seed": request_seed(self.run_seed, "rollout", step, key)}
            return self.client.generate(prompts, n=n, sampling=seeded,
                                        return_routed_experts=self.want_routes, endpoint=replica,
                                        on_request=log)

        t0 = time.monotonic()
        if len(chunks) == 1:
            score(chunks[0][1], gen(*chunks[0]))
        else:
            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                futures = {pool.submit(gen, *c): c[1] for c in chunks}
                if self.overlap:  # each chunk scored as it returns, while others generate
                    arrivals: Any = as_completed(futures)
                else:  # scored once every chunk has returned
                    wait(futures)
                    arrivals = futures
                for fut in arrivals:
                    score(futures[fut], fut.result())
        for i, future in submitted.items():
            groups[i] = group(i, self.scorer.result(future, reward))
        stats["seconds"] += time.monotonic() - t0
        busy = stats.setdefault("replica_busy", [0.0] * len(self.client.endpoints))
        for r, seconds in enumerate(log.busy(self.client.endpoints)):
            busy[r] += seconds
        return groups

    def _score(self, row: dict[str, Any], completions: list[Any], tokenizer: Any,
               reward: Any) -> Any:
        """Decode and score one prompt's completions in this thread."""
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        return reward.group_rewards(str(row[self.prompt_key]), texts,
                                    str(row.get(self.answer_key, "")))

    def _submit(self, row: dict[str, Any], completions: list[Any]) -> Any:
        """Hand one prompt's completions to the scoring pool; its future."""
        return self.scorer.submit(str(row[self.prompt_key]), [c.token_ids for c in completions],
                                  str(row.get(self.answer_key, "")))

    @staticmethod
    def _check_version(completions: list[Any], expect: int, step: int) -> None:
        for c in completions:
            served = engine_version(getattr(c, "weight_version", None))
            if served is not None and served != expect:
                raise JobError(
                    f"step {step}: a rollout engine sampled with weights version "
                    f"{c.weight_version!r} while the driver loaded v{expect}: a weight update "
                    "did not take effect (see the rollout log)")

    def evaluate(self, rows: list[dict[str, Any]], tokenizer: Any, reward: Any, context: Any,
                 step: int = 0) -> float:
        """Held-out accuracy of the engines' current weights (``eval.every_steps``): the eval
        split, ``eval.samples`` answers each at ``eval.temperature`` (0: greedy), the mean
        correctness — the in-run counterpart of the eval jobs. Seeded (``runtime.seeds``)
        with ``train.seed`` and the step."""
        from runtime.filters import Group
        from runtime.prompts import eval_max_tokens
        from runtime.seeds import request_seed

        cfg = self.spec["eval"]
        prompts = [tokenizer.encode(str(r[self.prompt_key]), add_special_tokens=False)
                   for r in rows]
        sampling = {"temperature": float(cfg["temperature"]),
                    "max_tokens": eval_max_tokens(self.spec),
                    "seed": request_seed(self.run_seed, "eval", step)}
        completions = self.client.generate(prompts, n=int(cfg["samples"]),
                                           sampling=sampling)
        futures = []
        if self.scorer is not None:  # every prompt's group at once, spread over the workers
            futures = [self._submit(row, comps)
                       for row, comps in zip(rows, completions, strict=True)]
        correct = []
        for k, (row, comps) in enumerate(zip(rows, completions, strict=True)):
            got = (self.scorer.result(futures[k], reward) if futures
                   else self._score(row, comps, tokenizer, reward))
            group = Group(row.get("id"), got.rewards, scores=got.scores)
            correct.append(context.correctness(group))
        return float(np.concatenate(correct).mean()) if correct else 0.0

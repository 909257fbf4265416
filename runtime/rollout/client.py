"""Rollout client: the RL driver's side of the rollout service.

``RolloutClient`` spreads a batch of token-id prompts over one or more endpoints —
our embedded server (``runtime.rollout.server``) or ``vllm serve`` — with the same
code, using only fields that exist in vLLM 0.33 (see ``runtime.rollout.protocol``).

* ``generate`` assigns prompts to endpoints round-robin (the starting endpoint
  rotates from call to call) or, with ``endpoint=i``, all to endpoint i (the driver's
  length balancing, ``runtime.rollout.balance``), sends one ``/v1/completions`` request
  per endpoint and chunk (``max_prompts_per_request``) concurrently, and returns
  ``Completion`` s in prompt order, n per prompt. It always asks for
  ``return_token_ids`` (exact ids, no detokenisation round trip), ``logprobs=0`` (the
  sampled token's logprob) and ``return_tokens_as_token_ids``. ``on_request(endpoint,
  start, finish)``, when given, is called after every completion request (each attempt)
  with its ``time.monotonic`` span: the driver's replica busy time
  (``runtime.rollout.replica_time``).
* Routed experts are decoded with ``runtime.router_replay.decode_routed_experts``
  and checked to have num_tokens − 1 − prompt_start rows.
* ``weight_version``: from the choice's ``weight_versions`` (ours and vLLM 0.33 send them;
  the oldest span wins: it bounds staleness), else ``GET /weight_info`` just before.
* Transport errors and 5xx are retried (``retries`` times) on another endpoint, chosen
  by ``runtime.rollout.failover``: a failed endpoint is skipped for ``down_s`` seconds and
  the retry goes at once to the live endpoint with the fewest requests in flight; only when
  every endpoint is down does a retry wait (``backoff_s``, doubling). An answer the client
  cannot use (malformed, missing fields), or none within the request's limit from an endpoint
  that still answers ``/health`` (slow, not dead), is retried elsewhere too, without marking
  the endpoint down. 4xx are raised at once as ``RolloutError`` with the server's message.
  A completion request's limit grows with the generation it asks for
  (``runtime.rollout.request_time``: ``timeout_s`` plus ``max_tokens`` at a decode floor per
  wave of ``max_num_seqs`` sequences in flight on its endpoint); with ``stall_s``, requests on
  an engine whose generated-token counter stands still that long are cut sooner, and retried
  elsewhere (``runtime.rollout.stall``).

Seeds do not depend on how the prompts are spread: vLLM and our engine seed every prompt
alike (sample j uses seed + j), so our engine samples the same whatever the split (vLLM's
batch mix can still flip near-tied tokens). With a seed, all prompts share one random
stream; leave ``seed`` unset for independent draws.

Weight updates follow vLLM's sequence on every endpoint: (pause) →
``/start_weight_update`` → ``/update_weights`` → ``/finish_weight_update`` with the
version → (resume). ``update_info`` defaults to our disk backend
(``{"path": path}``); against ``vllm serve`` pass the ``update_info`` of its
``--weight-transfer-config`` backend and run the trainer side of the transfer
(``runtime.rollout.weight_transfer``: NCCL after ``init_weight_transfer_engine``, IPC).
``reload_weights`` is vLLM's path reload (``/collective_rpc reload_weights``), which
``weight_sync: disk`` uses against ``vllm serve``.

This module holds the client's transport (HTTP, never through a proxy, retries, broadcast),
readiness and generation; the pause / weight-update / weight-transfer calls are the
``WeightUpdates`` mixin of ``runtime.rollout.client_updates`` that ``RolloutClient``
inherits, and ``RolloutError`` lives in ``runtime.rollout.client_errors``.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import numpy as np

from runtime.rollout.client_errors import RolloutError, error_message
from runtime.rollout.client_updates import WeightUpdates
from runtime.rollout.completion import Completion, to_completion
from runtime.rollout.failover import EndpointHealth
from runtime.rollout.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ProtocolError,
    choices_by_prompt,
)
from runtime.rollout.request_time import DECODE_FLOOR_TOKENS_PER_S, request_limit_s
from runtime.rollout.stall import Stalled, StallWatch

# Engines are cluster nodes: never through the submitter's http_proxy (the judge keeps it).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

__all__ = ["Completion", "RolloutClient", "RolloutError"]

# Sampling keys the client forwards into the request body; anything else is a typo
# or a feature the embedded server does not implement (vLLM would accept more).
_SAMPLING_KEYS = frozenset(
    {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos"}
)


@dataclass(frozen=True)
class _Job:
    endpoint: int
    prompt_indices: list[int]


class RolloutClient(WeightUpdates):
    """Client of one or more rollout endpoints (base URLs such as ``http://127.0.0.1:8000``)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout_s: float = 600.0,
        retries: int = 2,
        model: str | None = None,
        max_prompts_per_request: int = 256,
        max_workers: int | None = None,
        backoff_s: float = 0.5,
        down_s: float = 30.0,
        max_num_seqs: int = 256,
        decode_floor: float = DECODE_FLOOR_TOKENS_PER_S,
        stall_s: float | None = None,
        on_stall: Callable[[str, float], None] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("need at least one endpoint")
        if retries < 0 or timeout_s <= 0 or max_prompts_per_request < 1:
            raise ValueError("retries ≥ 0, timeout_s > 0 and max_prompts_per_request ≥ 1 required")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.model = model
        self.max_prompts_per_request = int(max_prompts_per_request)
        self.backoff_s = float(backoff_s)
        # request_limit_s's inputs: the engines' batch size, and sequences in flight on each
        self.max_num_seqs, self.decode_floor = int(max_num_seqs), float(decode_floor)
        self._sequences = dict.fromkeys(self.endpoints, 0)
        # stall_s: an engine that generates nothing that long with requests in flight is hung
        self._stall = (None if stall_s is None else
                       StallWatch(self._metrics, stall_s=stall_s, on_stall=on_stall))
        self._health = EndpointHealth(len(self.endpoints), down_s=down_s)
        self._pool = ThreadPoolExecutor(max_workers=max_workers or max(4, 2 * len(self.endpoints)))
        self._rr = itertools.count()
        self._lock = threading.Lock()
        # Per endpoint: None = unknown, True = choices carry weight_versions.
        self._sends_versions: dict[str, bool | None] = dict.fromkeys(self.endpoints)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._stall is not None:
            self._stall.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        query: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        watched: bool = False,
    ) -> Any:
        """``method`` ``path`` on ``endpoint``; its JSON answer. ``watched``: a POST the
        client's ``StallWatch`` cuts if the engine stops generating (``runtime.rollout.stall``)."""
        url = endpoint + path + (f"?{urlencode(query, doseq=True)}" if query else "")  # lists repeat
        data = None if body is None else json.dumps(body).encode()
        try:
            if watched and self._stall is not None:
                if method != "POST" or query or data is None:
                    raise ValueError("a watched request is a POST with a body and no query")
                status, raw = self._stall.post(endpoint, path, data, timeout or self.timeout_s)
            else:
                req = urllib.request.Request(url, data=data, method=method)
                if data is not None:
                    req.add_header("Content-Type", "application/json")
                with _DIRECT.open(req, timeout=timeout or self.timeout_s) as resp:
                    status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except Stalled as exc:
            raise RolloutError(f"{method} {url}: {exc}", endpoint=endpoint) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            slow = isinstance(getattr(exc, "reason", exc), TimeoutError)
            raise RolloutError(f"{method} {url} failed: {exc}", endpoint=endpoint,
                               timed_out=slow) from exc
        if status >= 300:  # urllib follows the redirects it may; the rest are failures
            raise RolloutError(f"{method} {url} → {status}: {error_message(raw)}",
                               status=status, endpoint=endpoint)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RolloutError(
                f"{method} {url}: response is not JSON: {raw[:200]!r}", endpoint=endpoint
            ) from exc

    def _metrics(self, endpoint: str) -> str | None:
        """The endpoint's ``/metrics`` text (the ``StallWatch``'s reading), None if unread."""
        try:
            with _DIRECT.open(endpoint + "/metrics", timeout=10.0) as resp:
                return resp.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return None

    def _with_retries(self, planned: int, fn: Any) -> Any:
        """Run ``fn(endpoint)`` on the planned endpoint, or where ``self._health`` sends it;
        on transport errors / 5xx retry on another (module doc)."""
        last: RolloutError | None = None
        tried: set[int] = set()
        for attempt in range(self.retries + 1):
            with self._health.attempt(planned, tried) as i:
                tried.add(i)
                if attempt and self._health.is_down(i):  # nowhere healthy left: wait
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                try:
                    result = fn(self.endpoints[i])
                except RolloutError as exc:
                    if exc.status is not None and exc.status < 500:
                        self._health.answered(i)
                        raise
                    # alive (answer unusable, or slow but /health answers): do not shun it
                    if exc.answered or (exc.timed_out and self._alive(self.endpoints[i])):
                        self._health.answered(i)
                    else:
                        self._health.failed(i)
                    last = exc
                    continue
            self._health.answered(i)
            return result
        assert last is not None
        raise last

    def _alive(self, endpoint: str) -> bool:
        try:
            self._request(endpoint, "GET", "/health", timeout=min(5.0, self.timeout_s))
        except RolloutError:
            return False
        return True

    def _broadcast(self, fn: Any) -> list[Any]:
        """Run ``fn(endpoint)`` on every endpoint concurrently; raise the first error. An
        endpoint that served its call is up again (``runtime.rollout.failover``)."""
        futures = [self._pool.submit(fn, e) for e in self.endpoints]
        results = [f.result() for f in futures]
        for i in range(len(self.endpoints)):
            self._health.answered(i)
        return results

    # -- readiness / introspection --------------------------------------------------------
    def wait_ready(self, timeout: float = 120.0, *, model_root: str | None = None) -> None:
        """Block until every endpoint answers ``/health``; learn the served model name.

        With ``model_root``, every endpoint must serve that model folder (``root`` of
        ``/v1/models``, the path given to ``vllm serve``): a stale engine of another run
        that holds the port is refused instead of silently sampled from."""
        deadline = time.monotonic() + timeout
        for endpoint in self.endpoints:
            while True:
                try:
                    self._request(endpoint, "GET", "/health", timeout=5.0)
                    break
                except RolloutError as exc:
                    if time.monotonic() > deadline:
                        raise RolloutError(
                            f"{endpoint} not ready after {timeout:g} s: {exc}"
                        ) from exc
                    time.sleep(0.2)
        for i, endpoint in enumerate(self.endpoints):
            if i > 0 and model_root is None:
                break
            listing = self._request(endpoint, "GET", "/v1/models", timeout=10.0)
            try:
                card = listing["data"][0]
                name, root = str(card["id"]), card.get("root")
            except (KeyError, IndexError, TypeError) as exc:
                raise RolloutError(f"unexpected /v1/models answer: {listing!r}") from exc
            if model_root is not None and not _same_path(root, model_root):
                raise RolloutError(
                    f"{endpoint} serves {root!r}, not this run's {model_root!r}: another "
                    "run's engine holds the port; stop it or choose another port")
            if self.model is None:
                self.model = name

    def weight_info(self) -> list[str]:
        """``/weight_info`` of every endpoint, in endpoint order."""
        return [
            str(r["weight_version"])
            for r in self._broadcast(
                lambda e: self._request(e, "GET", "/weight_info", timeout=30.0)
            )
        ]

    # -- generation -----------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int = 1,
        sampling: Mapping[str, Any] | None = None,
        return_routed_experts: bool = False,
        *,
        routed_experts_prompt_start: int = 0,
        endpoint: int | None = None,
        on_request: Callable[[str, float, float], None] | None = None,
    ) -> list[list[Completion]]:
        """Sample ``n`` completions of each prompt; result[i][j] is sample j of prompt i.
        ``endpoint``: the index of the endpoint every prompt goes to (None: round-robin);
        ``on_request``: called with (endpoint, start, finish) after every request."""
        sampling = dict(sampling or {})
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise ValueError(
                f"unsupported sampling keys {sorted(unknown)}; allowed: {sorted(_SAMPLING_KEYS)}"
            )
        prompt_lists = [[int(t) for t in p] for p in prompts]
        if not prompt_lists:
            return []
        if any(not p for p in prompt_lists):
            raise ValueError("every prompt needs at least one token")
        if endpoint is not None and not 0 <= endpoint < len(self.endpoints):
            raise ValueError(f"endpoint {endpoint} is not one of the {len(self.endpoints)}")
        if self.model is None:
            self.wait_ready()
        with self._lock:
            offset = next(self._rr)
        jobs = self._plan(len(prompt_lists), offset, endpoint)
        futures = [
            self._pool.submit(
                self._run_job,
                job,
                prompt_lists,
                n,
                sampling,
                return_routed_experts,
                routed_experts_prompt_start,
                on_request,
            )
            for job in jobs
        ]
        results: list[list[Completion] | None] = [None] * len(prompt_lists)
        for job, fut in zip(jobs, futures, strict=True):
            for i, completions in zip(job.prompt_indices, fut.result(), strict=True):
                results[i] = completions
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RolloutError(f"no completions came back for prompts {missing[:10]}")
        return [r for r in results if r is not None]

    def prompt_logprobs(self, token_ids: Sequence[int]) -> list[np.ndarray]:
        """Every endpoint's log-probs of ``token_ids`` read as a prompt (teacher-forced,
        vLLM's ``prompt_logprobs=0``): one float64 array of len − 1 per endpoint, entry t − 1
        = log p(x_t | x_<t). The weight-sync probe's engine side (``runtime.sync_check``)."""
        ids = [int(t) for t in token_ids]
        if len(ids) < 2:
            raise ValueError("a probe needs at least two tokens")
        if self.model is None:
            self.wait_ready()
        body = CompletionRequest(prompt=[ids], model=self.model, max_tokens=1, temperature=0.0,
                                 prompt_logprobs=0, return_token_ids=True).to_json()

        def one(endpoint: str) -> np.ndarray:
            raw = self._request(endpoint, "POST", "/v1/completions", body)
            try:
                choice = CompletionResponse.from_json(raw).choices[0]
                got = np.asarray(choice.prompt_token_logprobs(), dtype=np.float64)
            except (ProtocolError, KeyError, TypeError, ValueError, IndexError) as exc:
                raise RolloutError(f"{endpoint}: no prompt_logprobs in the response: {exc}",
                                   status=502, endpoint=endpoint) from exc
            if len(got) != len(ids) - 1:
                raise RolloutError(f"{endpoint}: {len(got)} prompt log-probs for {len(ids)} "
                                   "tokens", status=502, endpoint=endpoint)
            return got

        return self._broadcast(one)

    def _plan(self, num_prompts: int, offset: int, endpoint: int | None = None) -> list[_Job]:
        per_endpoint: dict[int, list[int]] = {}
        for i in range(num_prompts):
            e = (offset + i) % len(self.endpoints) if endpoint is None else endpoint
            per_endpoint.setdefault(e, []).append(i)
        jobs = []
        for e, idx in per_endpoint.items():
            for k in range(0, len(idx), self.max_prompts_per_request):
                jobs.append(_Job(e, idx[k : k + self.max_prompts_per_request]))
        return jobs

    def _run_job(
        self,
        job: _Job,
        prompts: list[list[int]],
        n: int,
        sampling: dict[str, Any],
        return_routed_experts: bool,
        prompt_start: int,
        on_request: Callable[[str, float, float], None] | None = None,
    ) -> list[list[Completion]]:
        chunk = [prompts[i] for i in job.prompt_indices]
        request = CompletionRequest(
            prompt=chunk,
            model=self.model,
            n=n,
            max_tokens=int(sampling.get("max_tokens", 16)),
            temperature=float(sampling.get("temperature", 1.0)),
            top_p=float(sampling.get("top_p", 1.0)),
            top_k=int(sampling.get("top_k", 0)),
            seed=None if sampling.get("seed") is None else int(sampling["seed"]),
            logprobs=0,
            stop_token_ids=[int(t) for t in sampling.get("stop_token_ids") or ()],
            ignore_eos=bool(sampling.get("ignore_eos", False)),
            return_token_ids=True,
            return_tokens_as_token_ids=True,
            routed_experts_prompt_start=prompt_start,
        )
        body = request.to_json()

        def call(endpoint: str) -> list[list[Completion]]:
            version = None
            if self._sends_versions.get(endpoint) is not True:
                version = self._probe_version(endpoint)
            seqs = len(chunk) * n
            with self._lock:
                self._sequences[endpoint] += seqs
                limit = request_limit_s(self.timeout_s, request.max_tokens,
                                        self._sequences[endpoint], self.max_num_seqs,
                                        self.decode_floor)
            start = time.monotonic()
            try:
                raw = self._request(endpoint, "POST", "/v1/completions", body, timeout=limit,
                                    watched=True)
            finally:
                with self._lock:
                    self._sequences[endpoint] -= seqs
                if on_request is not None:
                    on_request(endpoint, start, time.monotonic())
            try:
                response = CompletionResponse.from_json(raw)
                grouped = choices_by_prompt(response.choices, len(chunk), n)
            except (ProtocolError, KeyError, TypeError, ValueError) as exc:
                raise RolloutError(
                    f"{endpoint}: malformed completion response: {exc}", status=502,
                    answered=True,
                ) from exc
            return [
                [
                    self._completion(endpoint, chunk[p], c, version, return_routed_experts,
                                     prompt_start)
                    for c in grouped[p]
                ]
                for p in range(len(chunk))
            ]

        return self._with_retries(job.endpoint, call)

    def _completion(self, endpoint: str, prompt: list[int], choice: CompletionChoice,
                    probed: str | None, routes: bool, prompt_start: int) -> Completion:
        if choice.weight_versions is not None:
            self._sends_versions[endpoint] = True
        elif self._sends_versions.get(endpoint) is None:
            self._sends_versions[endpoint] = False
        return to_completion(endpoint, prompt, choice, probed, routes, prompt_start)

    def _probe_version(self, endpoint: str) -> str | None:
        """The endpoint's current weight version, for servers that do not stamp choices."""
        try:
            info = self._request(endpoint, "GET", "/weight_info", timeout=30.0)
        except RolloutError:
            return None  # vLLM without VLLM_SERVER_DEV_MODE has no /weight_info
        return None if not isinstance(info, dict) else info.get("weight_version")


def _same_path(a: Any, b: str) -> bool:
    return a is not None and os.path.realpath(str(a)) == os.path.realpath(b)

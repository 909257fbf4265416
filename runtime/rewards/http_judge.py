r"""LLM judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

For each pair the judge POSTs::

    {"model": model, "temperature": 0, "max_tokens": max_tokens,
     "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": <prompt, optional reference, A, B>}]}

and reads ``choices[0].message.content``. The reply must be one of the tokens ``A``
(a better), ``B`` (b better) or ``TIE``.

Parsing: a leading ``<think>…</think>`` block is removed; if the stripped reply
(surrounding quotes, ``*``, backticks, ``.``/``:`` removed, upper-cased) is exactly
A / B / TIE that is the verdict; otherwise, if the reply names exactly one of the
words A, B, TIE (as whole words), that one. Anything else (a body without
``choices[0].message.content`` included) is a parse failure: the verdict is TIE and
``parse_failures`` is incremented; the RL driver stops the run when a step's failures pass
``max_parse_failure_rate`` (``RewardComposer.judge_step``).

Transport: ``timeout_s`` per request; network errors, timeouts, HTTP 429 and 5xx are
retried ``retries`` times with exponential backoff (``backoff_s · 2^attempt``); when
they are exhausted, or on any other HTTP error (400, 401, 404: a configuration error),
:class:`JudgeError` is raised — a judge that is down must not silently turn every
group into ties.

Secrets: the API key is never a literal. ``api_key_env`` is the *name* of an
environment variable; it is read at every request and sent as ``Authorization:
Bearer …``. Construction fails if the variable is named but unset. ``url`` may be a
base URL (``http://host:8000`` or ``…/v1``) or the full chat-completions URL.

Counters (``stats()``): ``calls``, ``retries``, ``parse_failures``, ``errors``; ``add_stats``
adds the counts of a copy of the judge in a reward worker (``runtime.scoring``).
The judge is thread-safe (``pairwise_rewards(max_workers=…)``).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from runtime.rewards.base import Verdict

__all__ = ["SYSTEM_PROMPT", "HTTPJudge", "JudgeError", "parse_verdict"]

SYSTEM_PROMPT = (
    "You are a strict judge. You compare two responses, A and B, to the same prompt. "
    "Reply with exactly one token: A if response A is better, B if response B is better, "
    "TIE if they are equally good (for example both correct or both wrong)."
)

_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_WORDS = re.compile(r"\b(A|B|TIE)\b")
_VERDICTS = {"A": Verdict.BETTER, "B": Verdict.WORSE, "TIE": Verdict.TIE}


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or rejected the request."""


def parse_verdict(text: str) -> Verdict | None:
    """The verdict named by a judge reply, or None when it cannot be parsed."""
    text = _THINK.sub("", text)
    core = text.strip().strip("*`'\".: \n\t").upper()
    if core in _VERDICTS:
        return _VERDICTS[core]
    found = set(_WORDS.findall(text.upper()))
    if len(found) == 1:
        return _VERDICTS[found.pop()]
    return None


def _endpoint(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"judge url must be http(s): {url!r}")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class HTTPJudge:
    """Pairwise judge backed by an OpenAI-compatible chat-completions server."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = None,
        *,
        timeout_s: float = 60.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        max_tokens: int | None = 16,
        system_prompt: str = SYSTEM_PROMPT,
    ) -> None:
        self.endpoint = _endpoint(url)
        self.model = model
        if api_key_env is not None and api_key_env not in os.environ:
            raise ValueError(f"judge api_key_env names ${api_key_env}, which is not set")
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self._lock = threading.Lock()
        self._stats = {"calls": 0, "retries": 0, "parse_failures": 0, "errors": 0}

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def add_stats(self, counts: dict[str, int]) -> None:
        """Add counts made elsewhere (a copy of this judge in a reward worker,
        ``runtime.scoring``) to this judge's counters."""
        with self._lock:
            for key, value in counts.items():
                self._stats[key] = self._stats.get(key, 0) + int(value)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def _user_message(self, prompt: str, a: str, b: str, reference: str | None) -> str:
        parts = [f"[Prompt]\n{prompt}"]
        if reference:
            parts.append(f"[Reference answer]\n{reference}")
        parts += [f"[Response A]\n{a}", f"[Response B]\n{b}", "Answer with A, B or TIE."]
        return "\n\n".join(parts)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            headers["Authorization"] = "Bearer " + os.environ.get(self.api_key_env, "")
        data = json.dumps(payload).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                last = e
                if e.code != 429 and e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
            except json.JSONDecodeError as e:
                last = e
        self._count("errors")
        raise JudgeError(f"judge request to {self.endpoint} failed: {last}") from last

    def compare(
        self, prompt: str, response_a: str, response_b: str, reference: str | None = None
    ) -> Verdict:
        payload: dict[str, Any] = {
            "model": self.model,
            "temperature": 0.0,
            "messages": [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": self._user_message(prompt, response_a, response_b,
                                                               reference)},
            ],
        }
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        self._count("calls")
        body = self._post(payload)
        try:
            content = body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            content = ""
        verdict = parse_verdict(str(content))
        if verdict is None:
            self._count("parse_failures")
            return Verdict.TIE
        return verdict

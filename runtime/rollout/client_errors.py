"""Errors of the rollout client: ``RolloutError`` (a request the rollout service
refused or could not serve, with its HTTP status and endpoint) and ``error_message``,
which reads the message out of a vLLM-shaped error body. ``RolloutError`` is
re-exported by ``runtime.rollout.client``."""

from __future__ import annotations

import json

__all__ = ["RolloutError", "error_message"]


class RolloutError(RuntimeError):
    """A request the rollout service refused or could not serve. ``answered``: the endpoint
    did answer, and the client found the answer unusable (a malformed body, missing fields):
    retried elsewhere, but the endpoint is not marked down (``runtime.rollout.failover``).
    ``timed_out``: no answer within the client's timeout (a slow replica, or a hung one)."""

    def __init__(
        self, message: str, *, status: int | None = None, endpoint: str | None = None,
        answered: bool = False, timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint
        self.answered = answered
        self.timed_out = timed_out


def error_message(raw: bytes) -> str:
    """The message of a vLLM-shaped error body, or the raw text."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw[:500].decode(errors="replace")
    if isinstance(body, dict):
        err = body.get("error", body.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return str(body)[:500]

"""Errors of the rollout service's wire protocol: ``ProtocolError`` (a refused request,
with its HTTP status and vLLM ``param``) and ``error_body``, vLLM's ``ErrorResponse``
JSON (``{"error": {message, type, param, code}}``, ``ErrorInfo`` / ``ErrorResponse`` in
``vllm/entrypoints/serve/engine/protocol.py``). Shared by ``runtime.rollout.protocol``
(request parsing) and ``runtime.rollout.protocol_response`` (response types); both
names stay importable from ``runtime.rollout.protocol``."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

__all__ = ["ProtocolError", "error_body"]

_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    409: "ConflictError",
    413: "RequestEntityTooLarge",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ProtocolError(ValueError):
    """A request that the server refuses; carries the HTTP status and the offending
    parameter (vLLM's ``param``, e.g. ``"prompt"`` or ``"body.new_version"``)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(str(self), status=self.status, param=self.param)


def error_body(message: str, *, status: int = 400, param: str | None = None) -> dict[str, Any]:
    """vLLM's ``ErrorResponse`` JSON: ``{"error": {message, type, param, code}}``."""
    err_type = _ERROR_TYPES.get(status)
    if err_type is None:
        try:
            err_type = HTTPStatus(status).phrase
        except ValueError:
            err_type = "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": int(status)}}

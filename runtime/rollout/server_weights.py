"""Weight routes of the embedded rollout server: the ``WeightRoutes`` mixin of its
request handler (``runtime.rollout.server``) and vLLM's RL update state machine
(``_UpdateState``, ``rl_state_machine.py``: start → update* → finish).

It serves ``POST /start_weight_update`` / ``/update_weights`` / ``/finish_weight_update``
(the disk backend: ``update_info = {"path", "weight_version"}``),
``POST /init_weight_transfer_engine`` (empty ``init_info`` only),
``POST /collective_rpc`` (``reload_weights`` with ``kwargs.weights_path``),
``GET /get_world_size``, ``POST /update_weight_version`` and ``GET /weight_info``.
The transport (``_body``, ``_send_json``) and ``server`` come from the handler.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from runtime.rollout.protocol import ProtocolError

if TYPE_CHECKING:
    from runtime.rollout.server import RolloutHTTPServer

__all__ = ["WeightRoutes"]


class _UpdateState:
    """vLLM's RL state machine (``rl_state_machine.py``): start → update* → finish."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = False
        self.staged_version: str | None = None


class WeightRoutes:
    """Weight-update route handlers of the rollout server's request handler (a mixin)."""

    server: RolloutHTTPServer

    if TYPE_CHECKING:

        def _body(self, *, required: bool = False) -> Any: ...

        def _send_json(self, status: int, body: object) -> None: ...

    def start_weight_update(self, query: dict[str, list[str]]) -> None:
        self._body()  # {"is_checkpoint_format": bool}: every disk checkpoint is one
        st = self.server.update_state
        with st.lock:
            if st.active:
                raise ProtocolError(
                    "start_weight_update called while a weight update is already in progress. "
                    "Call POST /finish_weight_update first.",
                    status=409,
                )
            st.active = True
            st.staged_version = None
        self._send_json(200, {"message": "Weight update started"})

    def update_weights(self, query: dict[str, list[str]]) -> None:
        body = self._body(required=True)
        info = body.get("update_info")
        if info is None:
            raise ProtocolError("Missing 'update_info' in request body", param="body.update_info")
        if not isinstance(info, dict) or not isinstance(info.get("path"), str):
            raise ProtocolError(
                "update_info must be {'path': <checkpoint dir or .safetensors file>, "
                "'weight_version': <optional str>} (NCCL / IPC transfers are not implemented)",
                param="body.update_info",
            )
        version = info.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise ProtocolError("weight_version must be a string", param="body.update_info")
        st = self.server.update_state
        if not st.active:
            raise ProtocolError(
                "update_weights requires a preceding start_weight_update. "
                "Call POST /start_weight_update first.",
                status=409,
            )
        from runtime.rollout.engine import EngineError

        try:
            self.server.engine.load_weights(info["path"])
        except EngineError as exc:
            raise ProtocolError(str(exc), status=exc.status, param="body.update_info") from exc
        with st.lock:
            if version is not None:
                st.staged_version = version
        self._send_json(200, {"message": "Weights updated"})

    def finish_weight_update(self, query: dict[str, list[str]]) -> None:
        body = self._body()
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise ProtocolError("weight_version must be a string", param="body.weight_version")
        st = self.server.update_state
        with st.lock:
            if not st.active:
                raise ProtocolError(
                    "finish_weight_update called without a preceding start_weight_update.",
                    status=409,
                )
            final = version if version is not None else st.staged_version
            if final is not None:
                self.server.engine.set_weight_version(final)
            st.active = False
            st.staged_version = None
        self._send_json(200, {"message": "Weight update finished"})

    def init_weight_transfer_engine(self, query: dict[str, list[str]]) -> None:
        # vLLM: body {"init_info": dict} (required) → {"message": "Weight transfer initialized"}.
        # The disk backend needs no rendezvous, so it takes no init_info fields; NCCL / IPC
        # info sent here by mistake is refused rather than ignored.
        body = self._body(required=True)
        if "init_info" not in body:
            raise ProtocolError("Field required: init_info", param="body.init_info")
        info = body["init_info"]
        if not isinstance(info, dict):
            raise ProtocolError("init_info must be an object", param="body.init_info")
        if info:
            raise ProtocolError(
                f"this server's only transfer backend is disk (update_info {{'path': ...}}), "
                f"which takes no init_info; got {sorted(info)}",
                param="body.init_info",
            )
        self._send_json(200, {"message": "Weight transfer initialized"})

    def collective_rpc(self, query: dict[str, list[str]]) -> None:
        # vLLM dev mode: body {"method": str, "args": [str], "kwargs": {str: str}} runs the
        # method on every worker → {"results": [one per worker]}. Only the workers' path reload
        # `reload_weights(weights_path=...)` exists here (one worker: this process).
        body = self._body(required=True)
        method = body.get("method")
        if method is None:
            raise ProtocolError("Missing 'method' in request body", param="body.method")
        if method != "reload_weights":
            raise ProtocolError(f"Method {method!r} is not implemented.", status=501)
        kwargs = body.get("kwargs") or {}
        if body.get("args") or not isinstance(kwargs, dict) or set(kwargs) - {"weights_path"}:
            raise ProtocolError(
                "reload_weights takes only kwargs.weights_path here (a checkpoint folder)",
                param="body.kwargs",
            )
        path = kwargs.get("weights_path")
        if not isinstance(path, str):
            raise ProtocolError(
                "kwargs.weights_path (a checkpoint folder) is required", param="body.kwargs"
            )
        from runtime.rollout.engine import EngineError

        try:
            self.server.engine.load_weights(path)
        except EngineError as exc:
            raise ProtocolError(str(exc), status=exc.status, param="body.kwargs") from exc
        self._send_json(200, {"results": [None]})

    def get_world_size(self, query: dict[str, list[str]]) -> None:
        self._send_json(200, {"world_size": 1})

    def update_weight_version(self, query: dict[str, list[str]]) -> None:
        body = self._body(required=True)
        version = body.get("new_version")
        if not isinstance(version, str):
            raise ProtocolError("Field required: new_version (a string)", param="body.new_version")
        self.server.engine.set_weight_version(version)
        self._send_json(200, {"success": True, "new_version": version})

    def weight_info(self, query: dict[str, list[str]]) -> None:
        self._send_json(200, {"weight_version": self.server.engine.weight_version})

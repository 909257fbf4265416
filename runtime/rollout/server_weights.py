"""Weight routes of the embedded rollout server: the ``WeightRoutes`` mixin of its
request handler (``runtime.rollout.server``) and vLLM's RL update state machine
(``_UpdateState``, ``rl_state_machine.py``: start → update* → finish).

It serves ``POST /start_weight_update`` / ``/update_weights`` / ``/finish_weight_update``
with three transfer backends: disk, always (``update_info = {"path", "weight_version"}``),
vLLM's IPC when served with ``--weight-transfer-config '{"backend": "ipc"}'`` (unpacked
``IPCWeightTransferUpdateInfo``: ``names``, ``dtype_names``, ``shapes``,
``ipc_handles_pickled``, unpickled only with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` as
vLLM does; the tensors are mapped by ``runtime.rollout.shared_weights``), and vLLM's NCCL
with ``'{"backend": "nccl"}'`` (``NCCLWeightTransferUpdateInfo``: ``names``, ``dtype_names``,
``shapes``, received from the trainer's broadcast, ``runtime.rollout.broadcast_weights``);
``POST /init_weight_transfer_engine`` (empty ``init_info``, IPC's ``{"packed": false}``, or
NCCL's ``NCCLWeightTransferInitInfo`` with a file rendezvous, ``rendezvous`` and ``group``, in
place of vLLM's TCP address pair: the server joins the trainer's group),
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
        backend = self.server.weight_transfer
        if isinstance(info, dict) and "path" not in info and backend in ("ipc", "nccl"):
            source: Any = None  # read below, once the update is known to be open
        elif isinstance(info, dict) and isinstance(info.get("path"), str):
            source = info["path"]
        else:
            raise ProtocolError(
                "update_info must be {'path': <checkpoint dir or .safetensors file>, "
                "'weight_version': <optional str>}, or an IPC update when served with "
                "--weight-transfer-config '{\"backend\": \"ipc\"}' (or nccl)",
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

        if source is None:
            source = self._ipc_tensors(info) if backend == "ipc" else self._received(info)
        try:
            self.server.engine.load_weights(source)
        except EngineError as exc:
            raise ProtocolError(str(exc), status=exc.status, param="body.update_info") from exc
        del source  # the mapped tensors: the engine holds its own copy now
        with st.lock:
            if version is not None:
                st.staged_version = version
        self._send_json(200, {"message": "Weights updated"})

    def _ipc_tensors(self, info: dict[str, Any]) -> dict[str, Any]:
        """The tensors an unpacked IPC update maps (vLLM's ``IPCWeightTransferUpdateInfo``)."""
        import base64
        import binascii
        import os
        import pickle

        from runtime.rollout.shared_weights import open_shared

        extra = set(info) - {"names", "dtype_names", "shapes", "ipc_handles_pickled",
                             "ipc_handles", "tensor_sizes", "weight_version"}
        if extra or "ipc_handles_pickled" not in info or info.get("tensor_sizes") is not None:
            raise ProtocolError(
                "an IPC update over HTTP is {names, dtype_names, shapes, ipc_handles_pickled} "
                f"(unpacked){'; unknown fields ' + str(sorted(extra)) if extra else ''}",
                param="body.update_info")
        if os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
            raise ProtocolError("Refusing to deserialize `ipc_handles_pickled` without "
                                "VLLM_ALLOW_INSECURE_SERIALIZATION=1", param="body.update_info")
        try:
            handles = pickle.loads(base64.b64decode(info["ipc_handles_pickled"], validate=True))
            return dict(open_shared(info["names"], info["dtype_names"], info["shapes"],
                                    handles, self.server.engine.device))
        except (ValueError, TypeError, KeyError, binascii.Error, pickle.UnpicklingError,
                RuntimeError, OSError) as exc:
            raise ProtocolError(f"cannot map the IPC update: {exc}", param="body.update_info",
                                status=400) from exc

    def _received(self, info: dict[str, Any]) -> dict[str, Any]:
        """The tensors of an NCCL update (``NCCLWeightTransferUpdateInfo``: names, dtype_names,
        shapes), received from the trainer's broadcast in the group ``init`` joined."""
        from runtime.rollout.broadcast_weights import receive

        extra = set(info) - {"names", "dtype_names", "shapes", "weight_version"}
        if extra or not all(isinstance(info.get(k), list)
                            for k in ("names", "dtype_names", "shapes")):
            raise ProtocolError("an NCCL update is {names, dtype_names, shapes}"
                                f"{'; unknown fields ' + str(sorted(extra)) if extra else ''}",
                                param="body.update_info")
        joined = self.server.broadcast
        if joined is None:
            raise ProtocolError("no weight-transfer group: call POST "
                                "/init_weight_transfer_engine first", status=409)
        try:
            return receive(joined["group"], info["names"], info["dtype_names"],
                           info["shapes"], packed=joined["packed"],
                           buffer_size_bytes=joined["packed_buffer_size_bytes"])
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ProtocolError(f"cannot receive the NCCL update: {exc}",
                                param="body.update_info", status=400) from exc

    def _join(self, info: dict[str, Any]) -> None:
        """NCCL's init: join the trainer's group (``runtime.rollout.broadcast_weights``) as
        rank ``rank_offset`` (this server is one worker); returns once every rank is in."""
        from runtime.rollout.broadcast_weights import gloo_host, open_group
        from runtime.rollout.weight_transfer import PACKED_BUFFER_SIZE_BYTES

        fields = {"rendezvous", "group", "rank_offset", "world_size", "packed",
                  "packed_buffer_size_bytes", "packed_num_buffers"}
        if "master_address" in info or "nccl_unique_id_b64" in info:
            raise ProtocolError("the embedded engine joins the trainer's group through a file "
                                "rendezvous (init_info.rendezvous and .group), not a TCP store "
                                "or an NCCL id", param="body.init_info")
        if set(info) - fields or not {"rendezvous", "group", "rank_offset",
                                      "world_size"} <= set(info):
            raise ProtocolError(f"an NCCL init_info here is {sorted(fields)} "
                                f"(rendezvous, group, rank_offset, world_size required); got "
                                f"{sorted(info)}", param="body.init_info")
        host = self.server.server_address[0]
        try:
            group = open_group(info["rendezvous"], info["group"], int(info["rank_offset"]),
                               int(info["world_size"]), gloo_host(host in ("127.0.0.1", "::1")))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ProtocolError(f"cannot join the weight-transfer group: {exc}",
                                param="body.init_info", status=400) from exc
        self.server.broadcast = {
            "group": group, "packed": bool(info.get("packed", False)),
            "packed_buffer_size_bytes": int(info.get("packed_buffer_size_bytes",
                                                     PACKED_BUFFER_SIZE_BYTES))}

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
        # The disk backend needs no rendezvous, so it takes no init_info fields; IPC takes its
        # must-agree `packed` flag (unpacked only, here); anything else is refused rather than
        # ignored.
        body = self._body(required=True)
        if "init_info" not in body:
            raise ProtocolError("Field required: init_info", param="body.init_info")
        info = body["init_info"]
        if not isinstance(info, dict):
            raise ProtocolError("init_info must be an object", param="body.init_info")
        if self.server.weight_transfer == "nccl":
            self._join(info)
            self._send_json(200, {"message": "Weight transfer initialized"})
            return
        ipc = self.server.weight_transfer == "ipc"
        if info and not (ipc and info == {"packed": False}):
            expected = '{"packed": false} (unpacked only)' if ipc else "empty"
            raise ProtocolError(
                f"this server's transfer backend is {self.server.weight_transfer}, whose "
                f"init_info is {expected}; got {info}",
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

"""HTTP front end of the embedded rollout engine (stdlib only).

    python -m runtime.rollout.server --model DIR --host 127.0.0.1 --port P \\
        [--return-routed-experts] [--seed S] [--logprobs-mode raw_logprobs] \\
        [--quantization fp8] [--enable-sleep-mode] \\
        [--weight-transfer-config '{"backend": "ipc" | "nccl"}']

Serves the subset of vLLM's OpenAI-compatible API and RL dev endpoints described in
``runtime.rollout.protocol`` on a ``ThreadingHTTPServer``: ``GET /health``,
``GET /v1/models``, ``POST /v1/completions``, ``POST /pause`` / ``/resume``,
``GET /is_paused``, ``POST /start_weight_update`` / ``/update_weights`` /
``/finish_weight_update``, ``POST /update_weight_version``, ``GET /weight_info``,
``POST /init_weight_transfer_engine`` (empty ``init_info``, IPC's ``{"packed": false}``, or
NCCL's, which joins the trainer's group),
``POST /collective_rpc`` (only ``reload_weights`` with
``kwargs.weights_path``, vLLM's path reload), ``GET /get_world_size`` (1) and sleep
mode's ``POST /sleep?level=&mode=`` / ``POST /wake_up?tags=`` / ``GET /is_sleeping``.

Weight updates. vLLM's sequence is start_weight_update → update_weights (one or
more; ``update_info`` is consumed by the NCCL or IPC transfer backend chosen with
``--weight-transfer-config``, the trainer pushing tensors alongside) →
finish_weight_update (which publishes ``weight_version``). We keep the sequence and
its 409 ordering errors and implement three transfer backends: disk, ``update_info =
{"path": <checkpoint dir or .safetensors file>, "weight_version": <optional>}``, and,
with ``--weight-transfer-config '{"backend": "ipc"}'``, vLLM's unpacked IPC update (the
trainer's tensors mapped from shared memory), or with ``nccl`` vLLM's NCCL update (the
trainer's broadcast, received in the group init joined: a gloo group in vLLM's wire format,
``runtime.rollout.broadcast_weights``); both in ``runtime.rollout.server_weights``. Each
is loaded by the engine all-or-nothing, under the engine lock (so it never lands in the
middle of a forward). Pause first (``/pause?mode=wait``) so that no
output mixes versions; with ``mode=keep`` the frozen requests continue on the new
weights after ``/resume`` and report both versions in ``weight_versions``.

Requests that arrive while paused wait until ``/resume`` (vLLM does the same).
The server binds loopback addresses only, unless ``--allow-non-loopback`` is given
(the cluster case): nothing here authenticates requests. It prints one line
``serving on http://HOST:PORT`` once it accepts connections and shuts down
gracefully on SIGTERM / SIGINT (in-flight generations are aborted).

This module holds the server, the request handler's transport, health / models /
completions / pause routes, the route tables and ``main``; the weight-update,
weight-transfer and weight-version routes (and the update state machine) are the
``WeightRoutes`` mixin of ``runtime.rollout.server_weights``; the sleep routes are the
``SleepRoutes`` mixin of ``runtime.rollout.server_sleep`` (engine side:
``runtime.rollout.sleeping``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from runtime.rollout.protocol import (
    LOGPROB_FLOOR,
    PAUSE_MODES,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    ProtocolError,
    Usage,
    error_body,
    token_id_string,
)
from runtime.rollout.protocol_response import prompt_logprob_entries
from runtime.rollout.server_sleep import SleepRoutes
from runtime.rollout.server_weights import WeightRoutes, _UpdateState

if TYPE_CHECKING:
    from runtime.rollout.engine import LocalEngine, SampleOutput

__all__ = ["RolloutHTTPServer", "check_host", "main", "make_server"]

# Bodies above this are refused (413): a completion request is token ids, so even a
# large batch of long prompts stays far below it.
MAX_BODY_BYTES = 256 * 1024 * 1024


def check_host(host: str, *, allow_non_loopback: bool = False) -> None:
    """Refuse to bind anything but loopback unless explicitly allowed.

    A host name must resolve to loopback addresses only ("localhost" does)."""
    if allow_non_loopback:
        return
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve host {host!r}: {exc}") from exc
        addrs = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addrs or not all(a.is_loopback for a in addrs):
        raise ValueError(
            f"refusing to listen on {host!r}: not a loopback address. The rollout server "
            "has no authentication; pass --allow-non-loopback to serve a cluster network."
        )


class RolloutHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        engine: LocalEngine,
        *,
        served_model_name: str,
        return_routed_experts: bool,
        weight_transfer: str = "disk",
        verbose: bool = False,
    ) -> None:
        # IPv6 literals ("::1") need an AF_INET6 socket; decided before bind.
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.engine = engine
        self.served_model_name = served_model_name
        self.return_routed_experts = return_routed_experts
        self.weight_transfer = weight_transfer  # "disk", "ipc" or "nccl" (server_weights)
        self.broadcast: dict[str, Any] | None = None  # nccl: the group init joined
        self.verbose = verbose
        self.update_state = _UpdateState()
        self.created = int(time.time())
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


class _Handler(WeightRoutes, SleepRoutes, BaseHTTPRequestHandler):
    server: RolloutHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive for the client's connection reuse

    # -- plumbing -------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send_json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, param: str | None = None) -> None:
        self._send_json(status, error_body(message, status=status, param=param))

    def _read_json(self, *, required: bool) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ProtocolError(f"request body of {length} bytes is too large", status=413)
        raw = self.rfile.read(length) if length else b""
        self._body_read = True
        if not raw.strip():
            if required:
                raise ProtocolError("request body must be a JSON object", param="body")
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"Invalid JSON format: {exc}", param="body") from exc
        if not isinstance(body, dict):
            raise ProtocolError("request body must be a JSON object", param="body")
        return body

    def _dispatch(self, method: str) -> None:
        self._body_read = False  # one handler serves every request of a keep-alive connection
        url = urlsplit(self.path)
        routes = _GET_ROUTES if method == "GET" else _POST_ROUTES
        handler = routes.get(url.path)
        try:
            if handler is None:
                other = _POST_ROUTES if method == "GET" else _GET_ROUTES
                if url.path in other:
                    raise ProtocolError(f"method {method} not allowed on {url.path}", status=405)
                raise ProtocolError(f"no route {method} {url.path}", status=404)
            handler(self, parse_qs(url.query))
        except ProtocolError as exc:
            self._drain_body()
            self._send_json(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to answer
        except Exception as exc:  # one bad request must not kill the server
            self._drain_body()
            self._send_error(500, f"{type(exc).__name__}: {exc}")

    def _drain_body(self) -> None:
        # An unread body would be parsed as the next request on this keep-alive
        # connection; read it (bounded) or close the connection.
        length = int(self.headers.get("Content-Length") or 0)
        if length and not getattr(self, "_body_read", False):
            if length <= MAX_BODY_BYTES:
                self.rfile.read(length)
            else:
                self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _body(self, *, required: bool = False) -> Any:
        return self._read_json(required=required)

    # -- endpoints --------------------------------------------------------------------
    def health(self, query: dict[str, list[str]]) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def models(self, query: dict[str, list[str]]) -> None:
        name = self.server.served_model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.server.created,
            "owned_by": "rlspec",
            "root": self.server.engine.model_dir,
            "parent": None,
            "max_model_len": self.server.engine.max_model_len,
            "permission": [],
        }
        self._send_json(200, {"object": "list", "data": [card]})

    def completions(self, query: dict[str, list[str]]) -> None:
        req = CompletionRequest.from_json(self._body(required=True))
        if req.model is not None and req.model != self.server.served_model_name:
            raise ProtocolError(
                f"The model `{req.model}` does not exist.", status=404, param="model"
            )
        engine = self.server.engine
        from runtime.rollout.engine import EngineError

        try:
            outputs = engine.generate(
                req.prompt,
                n=req.n,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=req.seed,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                return_routed_experts=self.server.return_routed_experts,
                routed_experts_prompt_start=req.routed_experts_prompt_start,
                num_logprobs=req.logprobs or None,
                prompt_logprobs=req.prompt_logprobs is not None,
            )
        except EngineError as exc:
            raise ProtocolError(str(exc), status=exc.status) from exc
        from runtime.router_replay import encode_routed_experts

        choices: list[CompletionChoice] = []
        completion_tokens = 0
        for po in outputs:
            for s in po.samples:
                routed = None
                if s.routed_experts is not None:
                    routed = encode_routed_experts(s.routed_experts, num_experts=engine.num_experts)
                choices.append(
                    CompletionChoice(
                        index=len(choices),
                        text=engine.decode(s.token_ids),
                        finish_reason=s.finish_reason,
                        logprobs=None if req.logprobs is None else self._logprobs(req, s),
                        stop_reason=s.stop_reason,
                        token_ids=s.token_ids if req.return_token_ids else None,
                        prompt_token_ids=po.prompt_token_ids if req.return_token_ids else None,
                        routed_experts=routed,
                        weight_versions=list(s.weight_versions),
                        prompt_logprobs=None if po.prompt_logprobs is None else prompt_logprob_entries(
                            po.prompt_token_ids, po.prompt_logprobs, engine.token_text),
                    )
                )
                completion_tokens += len(s.token_ids)
        response = CompletionResponse(
            model=self.server.served_model_name,
            choices=choices,
            usage=Usage(sum(len(p) for p in req.prompt), completion_tokens),
            id=f"cmpl-{req.request_id or uuid.uuid4().hex}",
        )
        self._send_json(200, response.to_json())

    def _logprobs(self, req: CompletionRequest, s: SampleOutput) -> CompletionLogProbs:
        engine = self.server.engine

        def name(t: int) -> str:
            return token_id_string(t) if req.return_tokens_as_token_ids else engine.token_text(t)

        tokens = [name(t) for t in s.token_ids]
        offsets: list[int] = []
        pos = 0
        for tok in tokens:
            offsets.append(pos)
            pos += len(tok)
        tops: list[dict[str, float] | None] = []
        for i, t in enumerate(s.token_ids):
            # OpenAI semantics (as vLLM): the sampled token plus the top `logprobs`.
            entry = {name(t): max(float(s.logprobs[i]), LOGPROB_FLOOR)}
            if s.top_logprobs is not None:
                for tid, lp in s.top_logprobs[i]:
                    entry.setdefault(name(tid), max(lp, LOGPROB_FLOOR))
            tops.append(entry)
        return CompletionLogProbs(
            tokens=tokens,
            token_logprobs=[max(float(v), LOGPROB_FLOOR) for v in s.logprobs],
            top_logprobs=tops,
            text_offset=offsets,
        )

    def pause(self, query: dict[str, list[str]]) -> None:
        self._body()
        mode = (query.get("mode") or ["abort"])[-1]
        if mode not in PAUSE_MODES:
            raise ProtocolError(
                f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}", param="query.mode"
            )
        self.server.engine.pause(mode)
        self._send_json(200, {"status": "paused"})

    def resume(self, query: dict[str, list[str]]) -> None:
        self._body()
        self.server.engine.resume()
        self._send_json(200, {"status": "resumed"})

    def is_paused(self, query: dict[str, list[str]]) -> None:
        self._send_json(200, {"is_paused": self.server.engine.is_paused})

    def metrics(self, query: dict[str, list[str]]) -> None:
        """vLLM's Prometheus counter of generated tokens (``runtime.rollout.stall`` reads it)."""
        name = self.server.served_model_name.replace("\\", "\\\\").replace('"', '\\"')
        data = ("# TYPE vllm:generation_tokens_total counter\n"
                f'vllm:generation_tokens_total{{engine="0",model_name="{name}"}} '
                f"{float(self.server.engine.generated_tokens)}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)



_GET_ROUTES = {
    "/health": _Handler.health,
    "/v1/models": _Handler.models,
    "/is_paused": _Handler.is_paused,
    "/weight_info": _Handler.weight_info,
    "/get_world_size": _Handler.get_world_size,
    "/is_sleeping": _Handler.is_sleeping,
    "/metrics": _Handler.metrics,
}
_POST_ROUTES = {
    "/v1/completions": _Handler.completions,
    "/pause": _Handler.pause,
    "/resume": _Handler.resume,
    "/start_weight_update": _Handler.start_weight_update,
    "/update_weights": _Handler.update_weights,
    "/finish_weight_update": _Handler.finish_weight_update,
    "/update_weight_version": _Handler.update_weight_version,
    "/init_weight_transfer_engine": _Handler.init_weight_transfer_engine,
    "/collective_rpc": _Handler.collective_rpc,
    "/sleep": _Handler.sleep,
    "/wake_up": _Handler.wake_up,
}


def make_server(
    engine: LocalEngine,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    served_model_name: str | None = None,
    return_routed_experts: bool = False,
    allow_non_loopback: bool = False,
    weight_transfer: str = "disk",
    verbose: bool = False,
) -> RolloutHTTPServer:
    """Bind (not yet serve) an HTTP server for ``engine``; ``port=0`` picks a free port."""
    check_host(host, allow_non_loopback=allow_non_loopback)
    return RolloutHTTPServer(
        (host, port),
        engine,
        served_model_name=served_model_name or engine.model_dir,
        return_routed_experts=return_routed_experts,
        weight_transfer=weight_transfer,
        verbose=verbose,
    )


def main(argv: list[str] | None = None) -> int:
    from runtime.rollout.server_args import parse_args

    args = parse_args(argv, __doc__.split("\n\n")[0])
    # Checked before torch is imported and the model loaded: a refused host costs nothing.
    try:
        check_host(args.host, allow_non_loopback=args.allow_non_loopback)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.model):
        print(f"error: --model {args.model!r} is not a directory", file=sys.stderr)
        return 2

    import torch

    from runtime.rollout.engine import LocalEngine

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    engine = LocalEngine(
        args.model,
        device=args.device,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        logprobs_mode=args.logprobs_mode,
        max_model_len=args.max_model_len,
        fp8=args.quantization == "fp8",
        enable_sleep_mode=args.enable_sleep_mode,
    )
    if args.return_routed_experts and engine.router_group is None:
        print("error: --return-routed-experts needs an MoE model with routers", file=sys.stderr)
        return 2
    server = make_server(
        engine,
        args.host,
        args.port,
        served_model_name=args.served_model_name,
        return_routed_experts=args.return_routed_experts,
        allow_non_loopback=args.allow_non_loopback,
        weight_transfer=args.weight_transfer_config,
        verbose=args.verbose,
    )

    def stop(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever to return, which runs in this (main)
        # thread: call it from another thread. Abort generations so that handler
        # threads finish their responses quickly.
        engine.close()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving on {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What several rollout tests do to the embedded engine (test_rollout, test_rollout_sleep,
test_fp8): a full (uncached) forward's log-probs, a generation caught inside its token loop,
a raw JSON POST; and prompts of mixed lengths, which share one left-padded batch."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from runtime.rollout.engine import LocalEngine

MIXED_PROMPTS = [[5, 9, 12], [3, 4, 5, 6, 7, 8, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51],
                 [2]]


def full_logprobs(model: torch.nn.Module, prompt: list[int], out: list[int]) -> np.ndarray:
    """Logprobs of ``out`` under one uncached forward of prompt + out[:-1]."""
    ids = torch.tensor([prompt + out[:-1]])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return logp[len(prompt) - 1 :].gather(1, torch.tensor(out)[:, None]).squeeze(1).numpy()


def in_flight(eng: LocalEngine, **kw: object) -> tuple[threading.Thread, list]:
    """Start a long generation on a thread; return once it samples its first token (past the
    prefill, inside the token loop)."""
    out: list = []
    sampling = threading.Event()
    sample = eng._sample

    def first_token(*args: object, **kwargs: object) -> object:
        sampling.set()
        return sample(*args, **kwargs)

    eng._sample = first_token  # type: ignore[method-assign]
    t = threading.Thread(target=lambda: out.append(eng.generate(**kw)))  # type: ignore[arg-type]
    t.start()
    assert sampling.wait(timeout=60), "the generation never reached its token loop"
    return t, out


def post_json(url: str, body: object, raw: bytes | None = None) -> tuple[int, dict]:
    """POST ``body`` as JSON (or ``raw`` bytes); the status and the JSON answer, errors too."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class StubHandler(BaseHTTPRequestHandler):
    """A quiet request handler for the tests' stand-in engines: ``body()`` reads the request,
    ``send(status, body)`` answers."""

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def stub_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A loopback HTTP server of ``handler``, for the block: its URL. (A handler that waits
    must be released inside the block: closing joins the handlers' threads.)"""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def canned_server(body: bytes) -> Iterator[str]:
    """A loopback HTTP server answering every GET and POST with 200 and ``body``: its URL."""

    class Canned(StubHandler):
        def do_GET(self) -> None:
            self.send(200, body)

        def do_POST(self) -> None:
            self.body()
            self.send(200, body)

    with stub_server(Canned) as url:
        yield url

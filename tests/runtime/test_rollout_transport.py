"""The rollout client's transport: what reaches the engines, and how."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runtime.rollout.client import RolloutClient
from runtime.rollout.protocol import CompletionRequest


class _Engine(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"weight_version": "7"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def engine() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_engines_are_reached_directly_whatever_http_proxy_says(
        engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch hands the job the submitting shell's http_proxy; the engines are cluster nodes
    a login-node proxy does not reach (the http judge keeps the proxy: it is outside)."""
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens: a proxy would fail
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    client = RolloutClient([engine], timeout_s=10, retries=0)
    try:
        assert client._request(engine, "GET", "/weight_info") == {"weight_version": "7"}
    finally:
        client.close()


def test_every_completion_asks_vllm_for_its_weight_versions() -> None:
    """vLLM 0.33 stamps a choice's weight_versions only when asked."""
    body = CompletionRequest(prompt=[[1, 2]], max_tokens=4).to_json()
    assert body["return_weight_versions"] is True

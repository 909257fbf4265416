"""Sleep routes of the embedded rollout server: the ``SleepRoutes`` mixin of its request
handler (``runtime.rollout.server``), vLLM's dev-mode sleep router
(``vllm/entrypoints/serve/dev/sleep/api_router.py``):

- ``POST /sleep?level=N&mode=M`` (level default 1; mode abort | wait | keep, default
  abort) → 200, empty body;
- ``POST /wake_up`` with optional repeated ``tags`` (``?tags=weights&tags=kv_cache``;
  none wakes everything) → 200, empty body;
- ``GET /is_sleeping`` → ``{"is_sleeping": bool}``.

A level other than 0, 1, 2, a mode outside the pause modes or an unknown tag is a 400.
The engine side (and where it departs from vLLM) is ``runtime.rollout.sleeping``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime.rollout.protocol import PAUSE_MODES, ProtocolError
from runtime.rollout.sleeping import SLEEP_LEVELS

if TYPE_CHECKING:
    from runtime.rollout.server import RolloutHTTPServer

__all__ = ["SleepRoutes"]


class SleepRoutes:
    """``/sleep``, ``/wake_up`` and ``/is_sleeping`` of the request handler (a mixin)."""

    server: RolloutHTTPServer

    if TYPE_CHECKING:

        def _body(self, *, required: bool = False) -> Any: ...

        def _send_json(self, status: int, body: object) -> None: ...

        def send_response(self, code: int, message: str | None = None) -> None: ...

        def send_header(self, keyword: str, value: str) -> None: ...

        def end_headers(self) -> None: ...

    def _send_empty(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def sleep(self, query: dict[str, list[str]]) -> None:
        self._body()
        raw_level = (query.get("level") or ["1"])[-1]
        try:
            level = int(raw_level)
        except ValueError:
            level = -1
        if level not in SLEEP_LEVELS:
            raise ProtocolError(
                f"level must be one of {', '.join(map(str, SLEEP_LEVELS))}, got {raw_level!r}",
                param="query.level",
            )
        mode = (query.get("mode") or ["abort"])[-1]
        if mode not in PAUSE_MODES:
            raise ProtocolError(
                f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}", param="query.mode"
            )
        self.server.engine.sleep(level, mode)
        self._send_empty()

    def wake_up(self, query: dict[str, list[str]]) -> None:
        self._body()
        tags = query.get("tags") or None  # vLLM: no tags wakes everything
        try:
            self.server.engine.wake_up(tags)
        except ValueError as exc:
            raise ProtocolError(str(exc), param="query.tags") from exc
        self._send_empty()

    def is_sleeping(self, query: dict[str, list[str]]) -> None:
        self._send_json(200, {"is_sleeping": self.server.engine.is_sleeping})

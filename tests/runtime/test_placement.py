"""The engines' side of the trainer's step (``runtime.placement``): colocated engines sleep
at level 2 before the trainer steps and wake in two parts around the weight load; engines
on nodes of their own only load."""

from __future__ import annotations

from typing import Any

from runtime.placement import Placement


class RecordingClient:
    """Records the sleep-mode calls a ``RolloutClient`` would send."""

    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.calls.append(("sleep", level, mode))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tags))


class RecordingTransfer:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def push(self, client: Any, version: str, *, path: str | None = None,
             pause_mode: str | None = "wait") -> None:
        self.calls.append(("push", version, path, pause_mode))


def _placement(placement: str) -> tuple[Placement, list[tuple[Any, ...]]]:
    calls: list[tuple[Any, ...]] = []
    spec = {"rollout": {"placement": placement}}
    return Placement(spec, RecordingClient(calls), RecordingTransfer(calls)), calls


def test_colocated_engines_sleep_then_wake_weights_load_and_wake_the_kv_cache() -> None:
    placement, calls = _placement("colocated")
    placement.release()
    placement.load("3", "/run/weights/v3")
    assert calls == [
        ("sleep", 2, "abort"),  # level 2: the old weights are replaced anyway
        ("wake_up", ["weights"]),
        ("push", "3", "/run/weights/v3", None),  # asleep engines are paused already
        ("wake_up", ["kv_cache"]),
    ]
    seconds = placement.take_seconds()
    assert seconds is not None and seconds >= 0
    assert placement.take_seconds() == 0.0  # taken: the next step starts from zero


def test_disaggregated_engines_only_load() -> None:
    placement, calls = _placement("disaggregated")
    placement.release()
    placement.load("1", "/run/weights/v1")
    assert calls == [("push", "1", "/run/weights/v1", "wait")]
    assert placement.take_seconds() is None

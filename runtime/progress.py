"""Work a long job saves as it goes, so that a rerun after a kill resumes where it stopped.

The screen and eval jobs sample every prompt of a split, which on a large model takes hours;
a preempted, timed-out or killed job must not start again from zero. A ``Progress`` file is
append-only JSON lines::

    {"fingerprint": F}                 what the work is (its inputs and parameters)
    {"key": K, "value": V}             one finished item, in the order they finished
    ...

Each batch of items is flushed and fsynced before the job goes on, so a kill loses at most
the batch in flight. Opening a file of the same fingerprint gives its items back (a torn last
line, left by a kill in mid-write, is dropped and overwritten); a file of another fingerprint
(other prompts, another checkpoint, other parameters) is started again. The job removes the
file once its output is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Progress"]


class Progress:
    """The finished items of one piece of work (``done``: key → value), saved in ``path``."""

    def __init__(self, path: str | os.PathLike[str], fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: dict[str, Any] = {}
        kept = self._read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if kept is None:  # nothing usable: a fresh file with this work's header
            self._write_lines([{"fingerprint": fingerprint}], mode="w")
        else:
            with open(self.path, "r+b") as fh:  # drop a torn last line before appending
                fh.truncate(kept)

    def _read(self) -> int | None:
        """Load the items of a file of this fingerprint; the byte length of its whole
        lines, or None when there is no such file."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        end, items = 0, {}
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn by a kill in mid-write
            try:
                record = json.loads(line)
            except ValueError:
                break
            if end == 0:
                if not isinstance(record, dict) or record.get("fingerprint") != self.fingerprint:
                    return None
            elif isinstance(record, dict) and "key" in record:
                items[str(record["key"])] = record.get("value")
            end += len(line)
        if end == 0:
            return None
        self.done = items
        return end

    def add(self, items: Mapping[str, Any]) -> None:
        """Record finished items (saved to disk before this returns)."""
        self._write_lines([{"key": str(k), "value": v} for k, v in items.items()], mode="a")
        self.done.update((str(k), v) for k, v in items.items())

    def _write_lines(self, records: list[dict[str, Any]], *, mode: str) -> None:
        with open(self.path, mode, encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self) -> None:
        """The work is done: its file goes."""
        self.path.unlink(missing_ok=True)

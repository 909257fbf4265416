"""``weight_sync: nccl`` between the RL job's processes: the trainer's :class:`BroadcastSender`
holds each version's tensors and broadcasts one when the driver asks; the driver's
:class:`BroadcastWeightTransfer` asks, and has every engine receive the broadcast through
vLLM's ``/init_weight_transfer_engine`` and ``/update_weights`` (the data plane, a gloo
group in vLLM's NCCL wire format: ``runtime.rollout.broadcast_weights``).

They meet in the run's exchange folder (``runtime.exchange``)::

    weight-broadcast.json    the sender: pid, start time, host, session, and the time it last
                             refreshed the file (every RECORD_EVERY_S: the driver of a fresh
                             run clears the folder, and a sender on another node is known alive
                             only by this time, within SENDER_STALE_S)
    weight-broadcast.store   a FileStore: requests, replies, and the groups' rendezvous

The driver numbers its requests with the store's counter ``<session>/requests``; the sender
answers them in order, each with ``<session>/ack/<n>`` and then ``<session>/done/<n>``:

* ``{"op": "join", "group": g, "world_size": W, "packed": …, …}``: the sender joins the group
  ``<session>/g<g>`` as rank 0 while the driver has every engine join it
  (``init_info``: vLLM's ``NCCLWeightTransferInitInfo`` with ``rendezvous`` and ``group`` in
  place of the address pair, for the embedded engine); done once all are in.
* ``{"op": "send", "version": k}``: ack with ``k``'s update info (vLLM's
  ``NCCLWeightTransferUpdateInfo``: names, dtype names, shapes), or why not (this trainer does
  not hold ``k``: the first version of a resumed run, which the driver then loads from its
  folder, and says so); then the broadcast, while the driver's ``/update_weights`` requests
  are in flight; done once sent.

A restarted trainer is a new session: the driver sets up a new group with it. The sender
holds what an engine may still be asked to load, by the same rule as the weight folders
(``prune``), as copies when the trainer may update them in place meanwhile (the embedded
trainer with ``max_staleness`` > 0: it trains the next batch while the driver pushes).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.rollout.weight_transfer import (
    PACKED_BUFFER_SIZE_BYTES,
    PACKED_NUM_BUFFERS,
    DiskWeightTransfer,
    WeightTransfer,
    from_folder,
    group_ranks,
    tensor_metadata,
)

if TYPE_CHECKING:
    import torch

    from runtime.rollout.client import RolloutClient

__all__ = ["SENDER_FILE", "STORE_FILE", "BroadcastSender", "BroadcastWeightTransfer"]

SENDER_FILE = "weight-broadcast.json"
STORE_FILE = "weight-broadcast.store"
RECORD_EVERY_S = 2.0  # the sender rewrites its record this often
SENDER_STALE_S = 30.0  # a sender on another node whose record is older is taken for gone


def _store(exchange: Path) -> Any:
    import torch.distributed as dist

    store = dist.FileStore(str(exchange / STORE_FILE), -1)
    # An operation retries opening the file this long: the run's end replaces the exchange
    # folder (rl_metrics is written over artifacts/rl) while the trainer waits to be stopped.
    store.set_timeout(datetime.timedelta(seconds=5))
    return store


def _wait_key(store: Any, key: str, seconds: float) -> bool:
    """Whether ``key`` is set within ``seconds`` (a FileStore's timeout is a RuntimeError
    saying "Wait timeout"; a TCPStore's, a DistStoreError)."""
    try:
        store.wait([key], datetime.timedelta(seconds=seconds))
    except RuntimeError as exc:
        if "timeout" not in str(exc).lower():
            raise
        return False
    return True


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _wait(store: Any, key: str, gone: Callable[[], str], timeout_s: float) -> dict[str, Any]:
    """The JSON value of ``key`` once it is set; raises as soon as ``gone()`` says why the
    other end will never set it."""
    deadline = time.monotonic() + timeout_s
    while True:
        if _wait_key(store, key, 1.0):
            return json.loads(store.get(key))
        why = gone()
        if why:
            raise RuntimeError(f"weight broadcast: {why}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"weight broadcast: no {key} within {timeout_s:.0f} s")


class BroadcastSender:
    """The trainer's side (its main process): serves the driver's requests on a thread."""

    def __init__(self, exchange: str | Path, host: str, *, copy: bool = True,
                 timeout_s: float = 600.0) -> None:
        from runtime.processes import process_record

        self.exchange, self.host, self.timeout_s = Path(exchange), host, timeout_s
        self.copy = copy  # False: the published tensors do not change while they are held
        self.exchange.mkdir(parents=True, exist_ok=True)
        self.session = secrets.token_hex(6)
        self.store = _store(self.exchange)
        self.held: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self.sent: Counter[int] = Counter()  # broadcasts by version
        self._lock = threading.Lock()
        self._group: Any = None
        self._wire: dict[str, Any] = {}
        self._acked = -1  # the last request acknowledged
        self._stopping = threading.Event()
        self._record: dict[str, Any] = {**process_record(), "session": self.session}
        self._record_lock = threading.Lock()  # no refresh once close() has removed the record
        self._refresh()
        # Its own thread: a broadcast may take longer than SENDER_STALE_S.
        threading.Thread(target=self._keep_record, name="weight-broadcast-record",
                         daemon=True).start()
        self._thread = threading.Thread(target=self._serve, name="weight-broadcast", daemon=True)
        self._thread.start()

    def publish(self, version: int, folder: str | Path,
                named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hold ``version``'s tensors (on the CPU; copies unless ``copy`` is off) until
        ``prune``."""
        snapshot = [(name, t.detach().to("cpu", copy=self.copy)) for name, t in named_tensors]
        with self._lock:
            self.held[int(version)] = snapshot

    def prune(self, oldest: int) -> None:
        """Release every version older than ``oldest``."""
        with self._lock:
            self.held = {v: t for v, t in self.held.items() if v >= oldest}

    def _refresh(self) -> None:
        """Rewrite the sender's record with the time (module doc)."""
        from runtime.files import atomic_write_json

        with self._record_lock:
            # not into a folder the run's end (or a fresh run's driver) has removed
            if self._stopping.is_set() or not self.exchange.is_dir():
                return
            with contextlib.suppress(OSError):  # the exchange folder is being replaced
                atomic_write_json(self.exchange / SENDER_FILE, {**self._record, "time": time.time()})

    def _keep_record(self) -> None:
        while not self._stopping.wait(RECORD_EVERY_S):
            self._refresh()

    def close(self) -> None:
        with self._record_lock:
            self._stopping.set()  # not through the store: its folder may be gone by now
            path = self.exchange / SENDER_FILE
            try:  # a newer trainer's record is not this one's to remove
                if json.loads(path.read_text()).get("session") == self.session:
                    path.unlink(missing_ok=True)
            except (OSError, ValueError):
                pass
        self._thread.join(timeout=15.0)  # a broadcast in flight ends with the process
        with self._lock:
            self.held.clear()
        self._group = None

    def _reply(self, kind: str, n: int, body: dict[str, Any]) -> None:
        self.store.set(f"{self.session}/{kind}/{n}", json.dumps(body))
        if kind == "ack":
            self._acked = n

    def _serve(self) -> None:
        try:
            self._serve_requests()
        except Exception as exc:  # the record says why, and the driver loads from the folders
            self._record["error"] = _one_line(exc)
            self._refresh()

    def _serve_requests(self) -> None:
        n = 0
        while not self._stopping.is_set():
            key = f"{self.session}/request/{n}"
            try:
                if not _wait_key(self.store, key, 1.0):
                    continue
                request = json.loads(self.store.get(key))
            except RuntimeError:  # the exchange folder is being replaced: try again
                continue
            try:
                self._answer(n, request)
            except Exception as exc:  # the driver raises it; this thread serves the next
                self._reply("done" if self._acked == n else "ack", n, {"error": _one_line(exc)})
            n += 1

    def _answer(self, n: int, request: dict[str, Any]) -> None:
        from runtime.rollout.broadcast_weights import open_group, send

        if request["op"] == "join":
            self._reply("ack", n, {"ok": True})
            self._group = None  # the old group's engines are gone or rejoin the new one
            self._group = open_group(self.exchange / STORE_FILE,
                                     f"{self.session}/g{request['group']}", 0,
                                     request["world_size"], self.host, self.timeout_s)
            self._wire = {"packed": bool(request["packed"]),
                          "buffer_size_bytes": int(request["packed_buffer_size_bytes"])}
            self._reply("done", n, {"ok": True})
            return
        version = int(request["version"])
        with self._lock:
            tensors = self.held.get(version)
            held = sorted(self.held)
        if tensors is None or self._group is None:
            why = ("no group joined" if tensors is not None
                   else f"this trainer does not hold v{version} (it holds {held or 'none'})")
            self._reply("ack", n, {"error": why})
            return
        self._reply("ack", n, {"update_info": tensor_metadata(tensors)})
        send(self._group, tensors, **self._wire)
        self.sent[version] += 1
        self._reply("done", n, {"ok": True})


class BroadcastWeightTransfer(WeightTransfer):
    """The driver's side: each push asks the trainer's sender to broadcast the version while
    every engine receives it; a version the sender does not hold (or no live sender) is loaded
    from its folder by ``fallback``, and said."""

    weight_sync = "nccl"

    def __init__(self, exchange: str | Path, fallback: DiskWeightTransfer,
                 log: Callable[[str], None] | None = None, *, packed: bool = True,
                 packed_buffer_size_bytes: int = PACKED_BUFFER_SIZE_BYTES,
                 packed_num_buffers: int = PACKED_NUM_BUFFERS,
                 timeout_s: float = 3600.0) -> None:
        self.exchange, self.fallback, self.log = Path(exchange), fallback, log
        self.wire = {"packed": bool(packed),
                     "packed_buffer_size_bytes": int(packed_buffer_size_bytes),
                     "packed_num_buffers": int(packed_num_buffers)}
        self.timeout_s = timeout_s
        self.routes: Counter[str] = Counter()  # pushes by route: "broadcast" / "disk"
        self._joined: tuple[str, tuple[str, ...]] | None = None  # (session, endpoints)
        self._store: Any = None
        self._clock = time.monotonic
        self._seen: tuple[Any, float] = (None, 0.0)  # a remote record's stamp, seen when

    def _sender(self) -> tuple[dict[str, Any] | None, str]:
        """The trainer's live sender, or None and why there is none."""
        from runtime.processes import record_alive

        try:
            sender = json.loads((self.exchange / SENDER_FILE).read_text())
        except FileNotFoundError:
            return None, "the trainer has no weight sender running"
        if sender.get("error"):
            return None, f"the trainer's weight sender failed: {sender['error']}"
        if sender["host"] != socket.gethostname():
            return self._remote(sender)
        why = record_alive(sender, "trainer that would send it")
        return (None, why) if why else (sender, "")

    def _remote(self, sender: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """A sender on another node lives while its record keeps changing, timed by this
        process's clock (the nodes' clocks may differ)."""
        now, stamp = self._clock(), (sender["session"], sender.get("time"))
        if stamp != self._seen[0]:
            self._seen = (stamp, now)
        age = now - self._seen[1]
        if age > SENDER_STALE_S:
            return None, (f"the trainer's weight sender on {sender['host']} has not refreshed "
                          f"its record for {age:.0f} s")
        return sender, ""

    def _gone(self, session: str) -> Callable[[], str]:
        def why() -> str:
            sender, reason = self._sender()
            if sender is not None and sender["session"] != session:
                return "the trainer was restarted"
            return reason
        return why

    def _the_store(self) -> Any:
        if self._store is None:  # on first use: the driver creates the exchange folder later
            self._store = _store(self.exchange)
        return self._store

    def _ask(self, session: str, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        n = self._the_store().add(f"{session}/requests", 1) - 1
        self._store.set(f"{session}/request/{n}", json.dumps(request))
        return n, _wait(self._store, f"{session}/ack/{n}", self._gone(session), self.timeout_s)

    def _done(self, session: str, n: int) -> None:
        done = _wait(self._store, f"{session}/done/{n}", self._gone(session), self.timeout_s)
        if "error" in done:
            raise RuntimeError(f"weight broadcast failed in the trainer: {done['error']}")

    def _join(self, client: RolloutClient, session: str) -> None:
        world, offsets = group_ranks(client.world_sizes())
        group = self._the_store().add(f"{session}/groups", 1)
        n, ack = self._ask(session, {"op": "join", "group": group, "world_size": world,
                                     **self.wire})
        if "error" in ack:
            raise RuntimeError(f"weight broadcast: the trainer cannot join: {ack['error']}")
        # vLLM's NCCLWeightTransferInitInfo, with a file rendezvous for the address pair
        client.init_weight_transfer_engine([
            {"rendezvous": str(self.exchange / STORE_FILE), "group": f"{session}/g{group}",
             "rank_offset": offset, "world_size": world, **self.wire} for offset in offsets])
        self._done(session, n)
        self._joined = (session, tuple(client.endpoints))

    def push(self, client: RolloutClient, version: str, *, path: str | None = None,
             named_tensors: Any = None, pause_mode: str | None = "wait") -> None:
        if path is None:
            raise ValueError("weight_sync nccl here pushes a version the trainer wrote: pass "
                             "its folder (path)")
        if pause_mode is not None:
            client.pause(pause_mode)  # once: a fallback to the folder loads in the same pause
        try:
            why, sent = self._broadcast(client, version, path)
            if why:
                from_folder(self, client, version, path, f"not broadcast: {why}", None)
                return
        finally:
            if pause_mode is not None:
                client.resume()
        self.routes["broadcast"] += 1
        if self.routes["broadcast"] == 1 and self.log is not None:
            self.log(f"weights v{version} broadcast to the engines ({sent} tensors); the next "
                     "versions too, unless said")

    def _broadcast(self, client: RolloutClient, version: str, path: str) -> tuple[str, int]:
        """Broadcast ``version`` to the paused engines: ("", tensors sent), or why it was not
        (no live sender, or one that does not hold the version) and 0."""
        sender, why = self._sender()
        if sender is None:
            return why, 0
        session = sender["session"]
        try:
            if self._joined != (session, tuple(client.endpoints)):
                self._join(client, session)
            n, ack = self._ask(session, {"op": "send", "version": int(version)})
            if "update_info" not in ack:
                return ack["error"], 0
            client.update_weights(path, version, update_info=ack["update_info"],
                                  pause_mode=None)
            self._done(session, n)
        except BaseException:
            self._joined = None  # the group's collectives may be out of step: a new one
            raise
        return "", len(ack["update_info"]["names"])

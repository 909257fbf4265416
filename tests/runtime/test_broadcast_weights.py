"""weight_sync nccl on the CPU: vLLM's NCCL wire format over a gloo group
(runtime.rollout.broadcast_weights), the trainer's sender and the driver's push
(runtime.rollout.broadcast_transfer), and the embedded server's NCCL backend receiving it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runtime.policy import load_policy
from runtime.rollout.broadcast_transfer import (
    SENDER_FILE,
    STORE_FILE,
    BroadcastSender,
    BroadcastWeightTransfer,
)
from runtime.rollout.broadcast_weights import open_group, packed_chunks, send
from runtime.rollout.client import RolloutClient, RolloutError
from runtime.rollout.engine import LocalEngine
from runtime.rollout.weight_transfer import DiskWeightTransfer
from tests.helpers import REPO, rollout_servers
from tests.runtime.tiny_moe import MIXED_TENSORS, PROMPTS, SAMPLING

pytestmark = pytest.mark.usefixtures("one_thread")

NAMED = MIXED_TENSORS


def test_packed_buffers_close_once_they_hold_more_than_their_size() -> None:
    """vLLM's pack_tensors: the tensor that crosses the size is the buffer's last."""
    assert packed_chunks([4, 4, 4], 8) == [range(0, 3)]  # 8 is not more than 8
    assert packed_chunks([4, 5, 4], 8) == [range(0, 2), range(2, 3)]
    assert packed_chunks([20, 1, 1], 8) == [range(0, 1), range(1, 3)]  # one over-size tensor
    assert packed_chunks([3, 0, 6, 0], 8) == [range(0, 3), range(3, 4)]
    assert packed_chunks([], 8) == []


_RECEIVER = """
import json, sys, torch
from runtime.rollout.broadcast_weights import open_group, receive
store, meta, out = sys.argv[1:4]
meta = json.loads(meta)
group = open_group(store, "g", 1, 2, "127.0.0.1", timeout_s=60)
got = [receive(group, meta["names"], meta["dtype_names"], meta["shapes"], packed=packed,
               buffer_size_bytes=24) for packed in (False, True)]
torch.save(got, out)
"""


def test_a_broadcast_arrives_bit_exact_packed_and_unpacked(tmp_path: Path) -> None:
    """Every dtype, a view, a 0-dim and an empty tensor, over buffers smaller than some."""
    from runtime.rollout.weight_transfer import tensor_metadata

    meta = tensor_metadata(NAMED)
    store = tmp_path / STORE_FILE
    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(store), json.dumps(meta),
                                 str(tmp_path / "got.pt")], cwd=REPO)
    try:
        group = open_group(store, "g", 0, 2, "127.0.0.1", timeout_s=60)
        send(group, NAMED, packed=False, buffer_size_bytes=24)
        send(group, NAMED, packed=True, buffer_size_bytes=24)
        assert receiver.wait(timeout=60) == 0
    finally:
        receiver.kill()
    for got in torch.load(tmp_path / "got.pt"):
        assert list(got) == [n for n, _ in NAMED]
        for name, want in NAMED:
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


# ------------------------------------------------------------------------------ HTTP


@pytest.fixture(scope="module")
def nccl_servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RolloutClient]:
    """Two embedded servers with the NCCL backend: one group spans the trainer and both."""
    logs = tmp_path_factory.mktemp("nccl_server_logs")
    with rollout_servers(model_dir, logs, 2, "--weight-transfer-config",
                         '{"backend": "nccl"}') as urls:
        client = RolloutClient(urls, timeout_s=120, retries=0, backoff_s=0.05)
        client.wait_ready(timeout=60)
        try:
            yield client
        finally:
            client.close()


def _tokens(rows: list) -> list[list[int]]:
    return [c.token_ids for row in rows for c in row]


def _sample(url: str) -> list[list[int]]:
    one = RolloutClient([url], timeout_s=60, retries=0)
    try:
        return _tokens(one.generate(PROMPTS, n=2, sampling=SAMPLING))
    finally:
        one.close()


def test_the_engines_serve_exactly_the_weights_the_trainer_broadcast(
        nccl_servers: RolloutClient, model_dir: Path, other_weights: Path,
        tmp_path: Path) -> None:
    """A held version is broadcast to both engines (packed), which then sample what an engine
    loaded with those weights samples; a version the trainer does not hold, and any version
    once no trainer sends, are read from their folder (in the same pause), and said; a
    restarted trainer is a new group."""
    client = nccl_servers
    want = _tokens([list(o.samples) for o in LocalEngine(other_weights, seed=0).generate(
        PROMPTS, n=2, max_tokens=8, seed=5, ignore_eos=True)])
    start = _tokens([list(o.samples) for o in LocalEngine(model_dir, seed=0).generate(
        PROMPTS, n=2, max_tokens=8, seed=5, ignore_eos=True)])
    logged: list[str] = []
    transfer = BroadcastWeightTransfer(tmp_path, DiskWeightTransfer("local"), logged.append,
                                       packed_buffer_size_bytes=4096)
    other = load_policy(other_weights)[0].state_dict()  # the embedded engine's own names
    sender = BroadcastSender(tmp_path, "127.0.0.1", timeout_s=60)
    try:
        sender.publish(1, tmp_path, other.items())
        for t in other.values():  # the next step updates in place: the sender holds copies
            t.zero_()
        transfer.push(client, "1", path=str(other_weights))
        assert client.weight_info() == ["1", "1"] and sender.sent == {1: 1}
        assert [_sample(url) for url in client.endpoints] == [want, want]  # each engine
        pauses: list[str] = []
        pause = client.pause
        client.pause = lambda mode: (pauses.append(mode), pause(mode))[1]  # type: ignore[method-assign]
        transfer.push(client, "0", path=str(model_dir))  # not held: the folder
        del client.pause
        assert pauses == ["wait"]  # the fallback loads in the broadcast's pause
        assert logged[1] == (f"weights v0 from the folder {model_dir} (not broadcast: this "
                             "trainer does not hold v0 (it holds [1]))")
        assert _sample(client.endpoints[0]) == start
        sender.close()
        assert not (tmp_path / SENDER_FILE).exists()
        transfer.push(client, "1", path=str(other_weights))  # no trainer: the folder
        assert "not broadcast: the trainer has no weight sender running" in logged[2]
        restarted = BroadcastSender(tmp_path, "127.0.0.1", timeout_s=60)
        try:
            restarted.publish(3, tmp_path, load_policy(model_dir)[0].state_dict().items())
            transfer.push(client, "3", path=str(model_dir))
            assert restarted.sent == {3: 1} and client.weight_info() == ["3", "3"]
        finally:
            restarted.close()
        assert logged[0].startswith("weights v1 broadcast to the engines (")
        assert dict(transfer.routes) == {"broadcast": 2, "disk": 2}
    finally:
        sender.close()
        DiskWeightTransfer("local").push(client, "default", path=str(model_dir))


def test_a_trainer_that_dies_mid_push_is_an_error_not_a_hang(
        nccl_servers: RolloutClient, tmp_path: Path) -> None:
    """The sender's process record no longer matches a live process: the driver's wait for
    the trainer's answer ends with why."""
    (tmp_path / SENDER_FILE).write_text(json.dumps(
        {"pid": 2**22 + 1, "started": 0.0, "host": __import__("socket").gethostname(),
         "session": "gone"}))
    transfer = BroadcastWeightTransfer(tmp_path, DiskWeightTransfer("local"))
    assert transfer._sender() == (None, "the trainer that would send it (pid 4194305) has "
                                        "ended")
    with pytest.raises(RuntimeError, match=r"weight broadcast: the trainer that would send it"):
        transfer._ask("gone", {"op": "send", "version": 1})


def test_the_nccl_backend_refuses_what_it_cannot_join_or_receive(
        nccl_servers: RolloutClient, tmp_path: Path) -> None:
    client = RolloutClient(nccl_servers.endpoints[:1], timeout_s=30, retries=0)
    try:
        with pytest.raises(RolloutError, match="file rendezvous") as err:
            client.init_weight_transfer_engine([{"master_address": "127.0.0.1",
                                                 "master_port": 29500, "rank_offset": 1,
                                                 "world_size": 2}])
        assert err.value.status == 400
        with pytest.raises(RolloutError, match="rendezvous, group, rank_offset, world_size"):
            client.init_weight_transfer_engine([{"rendezvous": str(tmp_path / "s")}])
        with pytest.raises(RolloutError, match="an NCCL update is"):
            client.update_weights("", "x", update_info={"names": ["a"]}, pause_mode=None)
    finally:
        client.close()


def test_the_sender_answers_requests_in_order_while_the_trainer_steps(tmp_path: Path) -> None:
    """Requests come from another thread (the driver's process, in a run); a send of a pruned
    version is refused in its ack, and the sender goes on to the next request."""
    sender = BroadcastSender(tmp_path, "127.0.0.1", timeout_s=30)
    transfer = BroadcastWeightTransfer(tmp_path, DiskWeightTransfer("local"))
    try:
        sender.publish(4, tmp_path, NAMED[:2])
        sender.publish(5, tmp_path, NAMED[2:])
        sender.prune(5)
        answers: list[dict] = []
        worker = threading.Thread(target=lambda: answers.extend(
            transfer._ask(sender.session, {"op": "send", "version": v})[1] for v in (4, 5)))
        worker.start()
        worker.join(timeout=60)
        assert answers[0] == {"error": "this trainer does not hold v4 (it holds [5])"}
        assert answers[1] == {"error": "no group joined"}
    finally:
        sender.close()


def _until(condition, what: str, timeout_s: float = 30.0) -> None:
    """Wait for ``condition()`` (the sender's threads act on their own schedule)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.05)


def test_a_sender_on_another_node_is_alive_while_its_record_is_fresh(tmp_path: Path) -> None:
    """Trainer and driver on different nodes (Slurm): no pid to check, only whether the
    record keeps changing, timed by the driver's own clock (the nodes' clocks may differ)."""
    from runtime.rollout.broadcast_transfer import SENDER_STALE_S

    transfer = BroadcastWeightTransfer(tmp_path, DiskWeightTransfer("local"))
    now = [1000.0]
    transfer._clock = lambda: now[0]
    record = {"pid": 7, "started": 0.0, "host": "trainer-node-7", "session": "s",
              "time": 5.0}  # another node's clock: far from this one's
    (tmp_path / SENDER_FILE).write_text(json.dumps(record))
    assert transfer._sender() == (record, "")
    now[0] += SENDER_STALE_S + 5  # the record has not changed since
    sender, why = transfer._sender()
    assert sender is None
    assert why == (f"the trainer's weight sender on trainer-node-7 has not refreshed its "
                   f"record for {SENDER_STALE_S + 5:.0f} s")
    (tmp_path / SENDER_FILE).write_text(json.dumps({**record, "time": 7.0}))  # refreshed
    assert transfer._sender()[0] is not None


def test_the_sender_keeps_its_record_when_a_fresh_run_clears_the_folder(tmp_path: Path) -> None:
    """The driver of a fresh run removes the exchange folder, perhaps after the trainer's
    sender started: the sender writes its record again, so the run still broadcasts."""
    import shutil

    exchange = tmp_path / "exchange"
    sender = BroadcastSender(exchange, "127.0.0.1", timeout_s=30)
    transfer = BroadcastWeightTransfer(exchange, DiskWeightTransfer("local"))
    try:
        with sender._record_lock:  # not in the middle of a refresh
            shutil.rmtree(exchange)
        sender._refresh()  # the run's end removes the folder: the record does not bring it back
        assert not exchange.exists()
        exchange.mkdir()
        _until(lambda: transfer._sender()[0] is not None, "sender record again")
        assert transfer._sender()[0]["session"] == sender.session
    finally:
        sender.close()
    assert not (exchange / SENDER_FILE).exists()


def test_a_sender_that_fails_says_so_and_the_driver_loads_from_the_folders(
        tmp_path: Path) -> None:
    """Its thread ends on an error it cannot answer (here a request it cannot read): the
    record says why, so the driver does not wait on it for an hour."""
    sender = BroadcastSender(tmp_path, "127.0.0.1", timeout_s=30)
    transfer = BroadcastWeightTransfer(tmp_path, DiskWeightTransfer("local"))
    try:
        transfer._the_store().set(f"{sender.session}/request/0", "not json")
        _until(lambda: transfer._sender()[0] is None, "failure in the record")
        assert transfer._sender()[1].startswith(
            "the trainer's weight sender failed: JSONDecodeError: ")
    finally:
        sender.close()


def test_a_closing_sender_leaves_a_newer_trainers_record(tmp_path: Path) -> None:
    old = BroadcastSender(tmp_path, "127.0.0.1", timeout_s=30)
    new = BroadcastSender(tmp_path, "127.0.0.1", timeout_s=30)
    try:
        old.close()
        assert json.loads((tmp_path / SENDER_FILE).read_text())["session"] == new.session
    finally:
        new.close()
    assert not (tmp_path / SENDER_FILE).exists()

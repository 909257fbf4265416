"""weight_sync ipc on the CPU: tensors shared through a node's shared memory
(runtime.rollout.shared_weights), the trainer's and the driver's sides
(IPCPublisher, IPCWeightTransfer), and the embedded server's IPC update (vLLM's unpacked
IPCWeightTransferUpdateInfo over HTTP). The RL run with it: tests/runtime/test_rl_job.py."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runtime.policy import checkpoint_tensors, load_policy
from runtime.rollout.client import RolloutClient, RolloutError
from runtime.rollout.engine import LocalEngine
from runtime.rollout.publishers import IPCPublisher
from runtime.rollout.shared_weights import (
    device_key,
    open_shared,
    remove_segments,
    segment_path,
    share,
)
from runtime.rollout.weight_transfer import (
    IPC_UPDATE_FILE,
    DiskWeightTransfer,
    IPCWeightTransfer,
)
from tests.helpers import rollout_servers
from tests.runtime.tiny_moe import MIXED_TENSORS, PROMPTS, SAMPLING

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")

NAMED = MIXED_TENSORS


@pytest.fixture
def owner() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    remove_segments(name)


def _segments(owner: str) -> list[str]:
    return sorted(p.name for p in segment_path(owner, 0).parent.glob(f"rlspec-{owner}-v*"))


def test_tensors_shared_by_one_process_open_in_another(owner: str, tmp_path: Path) -> None:
    """Every dtype and shape (views, empty tensors) comes back equal in a process that only
    has the update body; the sender keeps nothing (the segment holds the bytes)."""
    kept, handles = share(NAMED, segment_path(owner, 3))
    assert kept == [] and all(set(h) == {device_key("cpu")} for h in handles)
    assert _segments(owner) == [f"rlspec-{owner}-v3"]
    info = IPCWeightTransfer.update_info(NAMED, handles)
    script = (
        "import base64, json, pickle, sys, torch\n"
        "from runtime.rollout.shared_weights import open_shared\n"
        "info = json.loads(sys.stdin.read())\n"
        "handles = pickle.loads(base64.b64decode(info['ipc_handles_pickled']))\n"
        "got = open_shared(info['names'], info['dtype_names'], info['shapes'], handles, 'cpu')\n"
        f"torch.save({{n: t.clone() for n, t in got}}, {str(tmp_path / 'got.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], input=json.dumps(info), text=True,
                   check=True, cwd=REPO, timeout=120)
    got = torch.load(tmp_path / "got.pt")
    assert list(got) == [n for n, _ in NAMED]
    for name, t in NAMED:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_segments_are_removed_by_version_and_mapped_ones_stay_readable(owner: str) -> None:
    for version in (1, 2, 3):
        share(NAMED[:1], segment_path(owner, version))
    _, handles = share(NAMED[:1], segment_path(owner, 4))
    mapped = open_shared(["w"], ["bfloat16"], [[10, 4]], handles, "cpu")[0][1]
    remove_segments(owner, keep=lambda version: version >= 3)
    assert _segments(owner) == [f"rlspec-{owner}-v3", f"rlspec-{owner}-v4"]
    remove_segments(owner)
    assert _segments(owner) == []
    assert torch.equal(mapped, NAMED[0][1])  # an engine that mapped it keeps its pages
    with pytest.raises(FileNotFoundError):
        open_shared(["w"], ["bfloat16"], [[10, 4]], handles, "cpu")


def test_a_write_that_fails_leaves_no_half_segment_and_a_killed_ones_is_swept(
        owner: str) -> None:
    """A full /dev/shm (or SIGTERM) mid-write removes its .tmp; a SIGKILLed writer's .tmp
    goes with the owner's next sweep, whatever the versions kept."""

    unwritable = torch.zeros(3).to_sparse()  # fails once the first tensor is written
    with pytest.raises(RuntimeError):
        share([NAMED[0], ("bad", unwritable)], segment_path(owner, 5))
    assert _segments(owner) == []
    segment_path(owner, 6).with_name(segment_path(owner, 6).name + ".tmp").write_bytes(b"x")
    remove_segments(owner, keep=lambda version: True)
    assert _segments(owner) == []


def test_weights_that_do_not_fit_the_shared_memory_are_refused_before_writing(
        owner: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before each segment write, and when the trainer starts: the versions an engine may
    load, and the next, each the size of the policy's checkpoint."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    free = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) * 2
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 0, free))
    IPCPublisher(owner, model_dir, versions=2)
    with pytest.raises(OSError, match=r"weight_sync ipc: the weights \(.* MiB\) do not fit in "
                                      r".* MiB free\): give the node"):
        IPCPublisher(owner, model_dir, versions=3)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**26, 2**26 - 100, 100))
    with pytest.raises(OSError, match=r"set system\.weight_sync: disk"):
        share(NAMED, segment_path(owner, 1))
    assert _segments(owner) == []  # nothing half-written


def test_a_handle_that_does_not_fit_is_refused(owner: str) -> None:
    _, handles = share(NAMED[:1], segment_path(owner, 1))
    ((_, (path, _, _)),) = handles[0].items()
    with pytest.raises(ValueError, match="no IPC handle of 'w' for this engine's device"):
        open_shared(["w"], ["bfloat16"], [[10, 4]], [{"cpu@elsewhere": (path, 0, 80)}], "cpu")
    with pytest.raises(ValueError, match="80 bytes at offset 0 cannot hold float32"):
        open_shared(["w"], ["float32"], [[10, 4]], handles, "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        open_shared(["w"], ["complex7"], [[10, 4]], handles, "cpu")
    with pytest.raises(ValueError, match="one each per tensor"):
        open_shared(["w", "v"], ["bfloat16"], [[10, 4]], handles, "cpu")
    with pytest.raises(ValueError, match="one device type"):
        share([("m", torch.zeros(1, device="meta"))], segment_path(owner, 2))


def test_a_version_goes_over_ipc_only_while_the_trainer_that_shared_it_lives(
        owner: str, tmp_path: Path) -> None:
    """The trainer's side writes the update body into the version's folder; the driver
    uses it only while that very process runs (a resumed run's trainer is another one)."""
    folder = tmp_path / "v1"
    folder.mkdir()
    publisher = IPCPublisher(owner)
    publisher.publish(1, folder, NAMED)
    info, why = IPCWeightTransfer.shared_update(folder)
    assert why == "" and info is not None and info["names"] == [n for n, _ in NAMED]
    body = json.loads((folder / IPC_UPDATE_FILE).read_text())
    assert body["pid"] == os.getpid()
    for edit, words in (({"pid": 2**22 + 1}, "(pid 4194305) has ended"),  # above pid_max
                        ({"started": body["started"] + 1}, "has ended"),  # the pid was reused
                        ({"host": "elsewhere"}, "on elsewhere, not on this node")):
        (folder / IPC_UPDATE_FILE).write_text(json.dumps({**body, **edit}))
        info, why = IPCWeightTransfer.shared_update(folder)
        assert info is None and words in why
    assert "does not exist" in IPCWeightTransfer.shared_update(tmp_path)[1]
    # A new publisher of the same owner (a restarted trainer) removes what the old one left.
    publisher.publish(2, folder, NAMED)
    publisher.prune(2)
    assert _segments(owner) == [f"rlspec-{owner}-v2"]
    IPCPublisher(owner)
    assert _segments(owner) == []


# ------------------------------------------------------------------------------ HTTP


@pytest.fixture(scope="module")
def ipc_client(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[RolloutClient]:
    """An embedded server with vLLM's IPC backend and its opt-in to pickled handles."""
    logs = tmp_path_factory.mktemp("ipc_server_logs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        servers = rollout_servers(model_dir, logs, 1, "--weight-transfer-config",
                                  '{"backend": "ipc"}')
        urls = servers.__enter__()
    client = RolloutClient(urls, timeout_s=60, retries=0, backoff_s=0.05)
    client.wait_ready(timeout=30)
    try:
        yield client
    finally:
        client.close()
        servers.__exit__(None, None, None)


def _tokens(rows: list) -> list[list[int]]:
    return [c.token_ids for row in rows for c in row]


def test_an_ipc_update_serves_exactly_the_shared_weights(
        ipc_client: RolloutClient, model_dir: Path, other_weights: Path, owner: str,
        tmp_path: Path) -> None:
    """In-process tensors (checkpoint names, as vLLM loads them, or the served model's own
    module names, copied in as they are), a trainer's shared version (its folder's update
    body), and a folder nobody shares (read from disk, and said): the engine then samples
    exactly what an engine loaded with those weights samples."""
    want = _tokens([[s for s in o.samples] for o in LocalEngine(other_weights, seed=0).generate(
        PROMPTS, n=2, max_tokens=8, seed=5, ignore_eos=True)])
    logged: list[str] = []
    transfer = IPCWeightTransfer(fallback=DiskWeightTransfer("local"), log=logged.append)
    other = load_policy(other_weights)[0]
    tensors = checkpoint_tensors(other)
    assert set(tensors) != set(other.state_dict())  # per-expert vs fused experts
    try:
        transfer.push(ipc_client, "ipc-1", named_tensors=tensors.items())
        assert ipc_client.weight_info() == ["ipc-1"]
        assert _tokens(ipc_client.generate(PROMPTS, n=2, sampling=SAMPLING)) == want
        transfer.push(ipc_client, "0", path=str(model_dir))  # (back to the start)
        transfer.push(ipc_client, "ipc-m", named_tensors=other.state_dict().items())
        assert _tokens(ipc_client.generate(PROMPTS, n=2, sampling=SAMPLING)) == want
        assert not list(segment_path(f"push{os.getpid()}", 1).parent.glob(
            f"rlspec-push{os.getpid()}-v*"))  # its own segment, removed after the push
        transfer.push(ipc_client, "0", path=str(model_dir))  # nobody shares it
        assert ipc_client.weight_info() == ["0"]
        assert logged[0].startswith("weights vipc-1 mapped over IPC (69 tensors)")
        assert logged[1:] == 2 * [f"weights v0 from the folder {model_dir} (not over IPC: "
                                  f"{model_dir / IPC_UPDATE_FILE} does not exist)"]
        folder = tmp_path / "v2"
        folder.mkdir()
        IPCPublisher(owner).publish(2, folder, tensors.items())
        transfer.push(ipc_client, "2", path=str(folder))
        assert _tokens(ipc_client.generate(PROMPTS, n=2, sampling=SAMPLING)) == want
        assert dict(transfer.routes) == {"ipc": 3, "disk": 2}
    finally:
        DiskWeightTransfer("local").push(ipc_client, "default", path=str(model_dir))


def test_ipc_is_refused_without_its_backend_or_the_pickle_opt_in(
        ipc_client: RolloutClient, model_dir: Path, owner: str,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    _, handles = share(NAMED[:1], segment_path(owner, 1))
    info = IPCWeightTransfer.update_info(NAMED[:1], handles)
    # init: IPC's must-agree flag, unpacked only
    ipc_client.init_weight_transfer_engine([{"packed": False}])
    with pytest.raises(RolloutError, match="unpacked only") as err:
        ipc_client.init_weight_transfer_engine([{"packed": True}])
    assert err.value.status == 400
    with pytest.raises(RolloutError, match=r"\(unpacked\)"):
        ipc_client.update_weights("", "x", update_info={**info, "tensor_sizes": [80]})
    logs = tmp_path_factory.mktemp("refusing_servers")
    with rollout_servers(model_dir, logs, 1) as plain, pytest.MonkeyPatch.context() as mp:
        mp.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
        with rollout_servers(model_dir, logs, 1, "--weight-transfer-config",
                             '{"backend": "ipc"}') as no_opt_in:
            for urls, words in ((plain, "when served with --weight-transfer-config"),
                                (no_opt_in, "without VLLM_ALLOW_INSECURE_SERIALIZATION=1")):
                client = RolloutClient(urls, timeout_s=60, retries=0)
                try:
                    with pytest.raises(RolloutError, match=words) as err:
                        client.update_weights("", "x", update_info=info)
                    assert err.value.status == 400
                    assert client.weight_info() == ["default"]
                finally:
                    client.close()
    # a body that maps but does not fit the served model: refused, nothing changed
    with pytest.raises(RolloutError, match="cannot load weights from the shared weights"):
        ipc_client.update_weights("", "x", update_info=info)
    assert ipc_client.weight_info() == ["default"]
    assert pickle.loads(base64.b64decode(info["ipc_handles_pickled"])) == handles

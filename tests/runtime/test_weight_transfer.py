"""runtime.rollout.weight_transfer: the bodies sent to vLLM, held to the pinned vLLM's classes.

vLLM is not installed here; its field names come from the table `tools/vllm_serve_options.py`
recorded from vLLM 0.33.0 (`tests/vllm_flags/vllm_serve_options.json`, key `weight_transfer`).
vLLM builds each body with `SomeInfo(**body)`: an unknown key or a missing required field is an
error on the engine, so both are errors here. The HTTP sides (disk for both engines) run
against the embedded server in tests/runtime/test_rollout.py.
"""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest
import torch

from compiler.render import vllm_weight_transfer_config
from runtime.rollout.broadcast_transfer import BroadcastWeightTransfer
from runtime.rollout.weight_transfer import (
    WEIGHT_TRANSFERS,
    DiskWeightTransfer,
    IPCWeightTransfer,
    NCCLWeightTransfer,
    driver_weight_transfer,
    tensor_metadata,
)

FACTS = json.loads(
    (Path(__file__).resolve().parents[1] / "vllm_flags" / "vllm_serve_options.json").read_text()
)["weight_transfer"]

NAMED = [
    ("model.embed_tokens.weight", torch.zeros(10, 4, dtype=torch.bfloat16)),
    ("model.layers.0.mlp.experts.3.down_proj.weight", torch.zeros(4, 6, dtype=torch.float16)),
    ("model.norm.weight", torch.zeros(4)),
    ("lm_head.weight", torch.zeros(4, 10, dtype=torch.bfloat16).t()),  # a non-contiguous view
]


def assert_fits(body: dict, fields: dict) -> None:
    """`body` would construct vLLM's dataclass whose recorded fields are `fields`."""
    assert set(body) <= set(fields), sorted(set(body) - set(fields))
    missing = [name for name, f in fields.items() if f["required"] and name not in body]
    assert not missing, missing


def test_the_registry_covers_every_weight_sync_value() -> None:
    from typing import get_args

    from spec.models import System

    values = set(get_args(System.model_fields["weight_sync"].annotation))
    assert set(WEIGHT_TRANSFERS) == values
    assert all(cls.weight_sync == name for name, cls in WEIGHT_TRANSFERS.items())
    # The backends the compiler renders for vLLM are the ones implemented here, and vLLM's.
    for name in values:
        config = vllm_weight_transfer_config(name)
        if name == "disk":
            assert config is None
        else:
            assert json.loads(config) == {"backend": name}
            assert name in FACTS["backends"] and name in FACTS["trainer_backends"]


def test_nccl_init_info_puts_each_endpoint_after_the_previous_ones() -> None:
    t = NCCLWeightTransfer("10.1.2.3", 29650, packed=False, packed_buffer_size_bytes=1 << 20)
    infos = t.init_infos([8, 16, 1])
    for info in infos:
        assert_fits(info, FACTS["init_info"]["nccl"])
        assert info["master_address"] == "10.1.2.3" and info["master_port"] == 29650
        assert info["world_size"] == 1 + 8 + 16 + 1 == t.world_size([8, 16, 1])
        assert info["packed"] is False and info["packed_buffer_size_bytes"] == 1 << 20
    # Trainer rank 0; workers' group ranks = offset + 0..n-1 tile 1..25 without overlap.
    assert [i["rank_offset"] for i in infos] == [1, 9, 25]
    ranks = [i["rank_offset"] + r for i, n in zip(infos, [8, 16, 1], strict=True) for r in range(n)]
    assert sorted(ranks) == list(range(1, infos[0]["world_size"]))
    # The TCP rendezvous, not the pre-shared unique id: vLLM refuses both at once.
    assert "nccl_unique_id_b64" not in infos[0]
    with pytest.raises(ValueError, match="≥ 1 worker"):
        t.init_infos([8, 0])
    with pytest.raises(ValueError, match="≥ 1 worker"):
        t.init_infos([])


def test_nccl_update_info_is_vllms_exactly() -> None:
    info = NCCLWeightTransfer.update_info(NAMED)
    assert set(info) == set(FACTS["update_info"]["nccl"])  # every field, nothing else
    assert info["names"] == [n for n, _ in NAMED]
    # vLLM rebuilds each receive buffer as torch.empty(shape, dtype=getattr(torch, name)).
    for (_, t), dt, shape in zip(NAMED, info["dtype_names"], info["shapes"], strict=True):
        assert getattr(torch, dt) == t.dtype and torch.empty(shape).shape == t.shape
    assert info["dtype_names"] == ["bfloat16", "float16", "float32", "bfloat16"]
    assert info["shapes"][-1] == [10, 4]
    json.dumps(info)  # travels as JSON
    with pytest.raises(ValueError, match="unique"):
        tensor_metadata([NAMED[0], NAMED[0]])


def test_ipc_bodies_are_vllms() -> None:
    assert_fits(IPCWeightTransfer.init_info(), FACTS["init_info"]["ipc"])
    handles = [{"GPU-0f": ("storage", i, (2, 3))} for i in range(len(NAMED))]
    info = IPCWeightTransfer.update_info(NAMED, handles)
    assert_fits(info, FACTS["update_info"]["ipc"])
    # Over HTTP only the pickled form: vLLM refuses ipc_handles and ipc_handles_pickled together.
    assert "ipc_handles" not in info and "tensor_sizes" not in info  # unpacked
    assert pickle.loads(base64.b64decode(info["ipc_handles_pickled"], validate=True)) == handles
    assert {k: info[k] for k in ("names", "dtype_names", "shapes")} == tensor_metadata(NAMED)
    json.dumps(info)
    with pytest.raises(ValueError, match="3 IPC handles for 4 tensors"):
        IPCWeightTransfer.update_info(NAMED, handles[:3])


def test_disk_bodies() -> None:
    assert DiskWeightTransfer.update_info("/run/weights/v3") == {"path": "/run/weights/v3"}
    # vLLM's path reload passes weights_path to the workers' reload_weights.
    assert "weights_path" in FACTS["reload_weights_params"]
    with pytest.raises(ValueError, match="engine"):
        DiskWeightTransfer("sglang")


class _NoClient:
    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the client was called ({name}) before the arguments were checked")


def test_push_refuses_what_it_cannot_send() -> None:
    with pytest.raises(ValueError, match="pass path"):
        DiskWeightTransfer("vllm").push(_NoClient(), "1")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="connect"):
        NCCLWeightTransfer("127.0.0.1", 29650).push(_NoClient(), "1", named_tensors=NAMED)  # type: ignore[arg-type]
    # A folder nobody shares, and no disk route to fall back to
    with pytest.raises(ValueError, match=r"no shared weights for /x: /x/ipc_update\.json does not"):
        IPCWeightTransfer().push(_NoClient(), "1", path="/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass named_tensors, or the path"):
        IPCWeightTransfer().push(_NoClient(), "1")  # type: ignore[arg-type]


@pytest.mark.parametrize(("engine", "weight_sync", "mode", "noted"), [
    ("local", "nccl", "local", False),  # the trainer broadcasts; the folder where it cannot
    ("local", "disk", "local", False),
    ("vllm", "disk", "vllm", False),
    ("vllm", "nccl", "vllm", True),  # the trainer does not join vLLM's group: said, not hidden
    ("local", "ipc", "local", False),  # shared memory, and the folder where nobody shares it
    ("vllm", "ipc", "vllm", False),
])
def test_the_driver_pushes_the_checkpoint_folder(engine: str, weight_sync: str, mode: str,
                                                 noted: bool, tmp_path: Path) -> None:
    transfer, note = driver_weight_transfer(
        {"rollout": {"engine": engine}, "system": {"weight_sync": weight_sync},
         "cluster": {"devices": "gpu"}}, exchange=tmp_path)
    if weight_sync == "ipc":
        assert isinstance(transfer, IPCWeightTransfer) and transfer.fallback is not None
        transfer = transfer.fallback
    if (engine, weight_sync) == ("local", "nccl"):
        assert isinstance(transfer, BroadcastWeightTransfer) and transfer.exchange == tmp_path
        transfer = transfer.fallback
    assert isinstance(transfer, DiskWeightTransfer) and transfer.engine == mode
    assert transfer.after_reload == ()  # GPU engines re-run their own kernel set-up on reload
    assert (note is not None) == noted
    if noted:
        assert weight_sync in note
    with pytest.raises(ValueError, match="weight_sync"):
        driver_weight_transfer({"rollout": {"engine": "vllm"}, "system": {"weight_sync": "rdma"},
                                "cluster": {"devices": "gpu"}})
    cpu, _ = driver_weight_transfer({"rollout": {"engine": engine}, "cluster": {"devices": "cpu"},
                                     "system": {"weight_sync": weight_sync}}, exchange=tmp_path)
    cpu = getattr(cpu, "fallback", None) or cpu
    # vLLM's CPU build: each reload is followed by its experts' repack (runtime.rollout.vllm_worker)
    assert cpu.after_reload == (("repack_cpu_experts",) if mode == "vllm" else ())

"""HF folders written and read by the ranks of a Megatron model, a layer at a time
(``runtime.megatron.hf_folder``): what the RL trainer publishes after every step, reads back on
resume, and what the SFT and conversion jobs write.

Each layout's ranks read the folder ``save_policy`` wrote into exactly the weights the
in-memory conversion gives, and write a folder that holds exactly ``save_policy``'s tensors
(names, dtypes, values), config and tokenizer, which transformers loads; no rank holds more
than one layer's weights while writing (the 245 B example's model, ~490 GB, is never whole
in one process).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.megatron._folder_worker import run
from tests.megatron._worker import launch

pytestmark = pytest.mark.megatron


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _largest_unit(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the largest decoder layer (or outer weight) of a folder's tensors."""
    units: dict[str, int] = {}
    for name, t in tensors.items():
        unit = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        units[unit] = units.get(unit, 0) + t.numel() * t.element_size()
    return max(units.values())


def _same(have: torch.Tensor, want: torch.Tensor, half: bool) -> bool:
    """Equal; in a half-precision model, a weight HF keeps in float32 (DeepSeek-V3's router)
    went through the Megatron model's bfloat16 parameter: equal once rounded so."""
    if half and want.dtype == torch.float32:
        return torch.equal(have.bfloat16(), want.bfloat16())
    return torch.equal(have, want)


def _check(workdir: Path, outs: list[dict[str, Any]], layers: int, half: bool = False) -> None:
    from runtime.files import COMPLETE_MARKER
    from runtime.policy import load_policy

    for rank, out in enumerate(outs):
        assert out["differ"] == [], f"rank {rank}: the folder load differs in {out['differ']}"
    ref, got = workdir / "ref", workdir / "out"
    want, have = _tensors(ref), _tensors(got)
    assert sorted(have) == sorted(want)
    for name, t in want.items():
        assert have[name].dtype == t.dtype and _same(have[name], t, half), name
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert json.loads((got / name).read_text()) == json.loads((ref / name).read_text()), name
    index = json.loads((got / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in want.values())
    assert len(set(index["weight_map"].values())) >= layers + 2  # one file per unit
    marker = json.loads((got / COMPLETE_MARKER).read_text())
    assert marker["artifact"] == "hf_checkpoint" and marker["step"] == 3
    # the writers held one unit at a time, never the model
    largest, total = _largest_unit(want), sum(t.numel() * t.element_size() for t in want.values())
    held = [out["held"] for out in outs]
    assert max(held) <= largest < total / 2, (held, largest, total)
    model, _ = load_policy(got)
    for name, t in load_policy(ref)[0].state_dict().items():
        assert _same(model.state_dict()[name], t, half), name


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "glm4_moe", "qwen3", "llama"])
@pytest.mark.usefixtures("megatron_cpu")
def test_one_rank_round_trips_every_family(tmp_path: Path, family: str) -> None:
    _check(tmp_path, [run(0, 1, 1, 1, 1, tmp_path, {"family": family, "layers": 3})], 3)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.usefixtures("megatron_cpu")
def test_a_bfloat16_model_writes_what_save_pretrained_writes(tmp_path: Path, family: str) -> None:
    """bf16 parameters (--bf16 on GPUs), the routers' selection bias a float32 buffer: the
    folder holds bfloat16 weights, and the float32 ones where HF keeps them (DeepSeek-V3's
    router and its bias), as save_pretrained writes a model loaded in bfloat16."""
    _check(tmp_path, [run(0, 1, 1, 1, 1, tmp_path, {"family": family, "layers": 3,
                                                     "dtype": "bfloat16"})], 3, half=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize(("tp", "ep", "pp", "options"), [
    (2, 2, 1, {"layers": 3}),
    (2, 1, 1, {"layers": 3, "etp": "tp"}),
    (1, 1, 2, {"layers": 4, "tie": 1}),
    (1, 1, 2, {"layers": 4, "vpp": 2}),
], ids=["tp2-ep2", "tp2-etp2", "pp2-tied", "pp2-vpp2"])
def test_two_ranks_write_and_read_their_shards(tmp_path: Path, tp: int, ep: int, pp: int,
                                               options: dict[str, Any]) -> None:
    """TP=2 splits attention, vocabulary and (with ETP = TP) the experts; EP=2 puts half the
    experts on each rank; PP=2 writes each stage's file from its own rank (a tied output
    layer is the first stage's embedding); VPP=2 interleaves two chunks per rank."""
    args = [str(tp), str(ep), str(pp), str(tmp_path), *(f"{k}={v}" for k, v in options.items())]
    _check(tmp_path, launch("tests.megatron._folder_worker", 2, args, tmp_path),
           int(options["layers"]))


def test_ranks_wait_for_a_slow_stage_writer_past_the_collectives_timeout(tmp_path: Path) -> None:
    """PP=2, the second stage's writer writes for longer than the default group's timeout
    (2 s here, NCCL's 10 minutes on a cluster; at 245B a writer writes 61 GB each step): rank
    0 waits for it through ``file_group`` (gloo, FILE_WAIT) and both write the folder."""
    args = ["1", "1", "2", str(tmp_path), "layers=2", "slow=1"]
    outs = launch("tests.megatron._folder_worker", 2, args, tmp_path)
    assert all("error" not in out for out in outs), outs
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("fail", ["1", "rename"], ids=["stage-disk-full", "rename-refused"])
def test_a_failed_write_fails_every_rank_and_leaves_no_folder(tmp_path: Path, fail: str) -> None:
    """PP=2. The second stage's writer cannot write (disk full): it goes on through the
    gathers, then every rank raises with its message. Or rank 0 cannot rename the folder into
    place: every rank raises too. None waits in a collective for a rank that left (the job
    fails at once), and neither the folder nor its temporary is left."""
    args = ["1", "1", "2", str(tmp_path), "layers=2", f"fail={fail}"]
    outs = launch("tests.megatron._folder_worker", 2, args, tmp_path)
    if fail == "1":
        for out in outs:
            assert "rank 1 writing" in out["error"] and "No space left" in out["error"], out
    else:
        assert "Read-only file system" in outs[0]["error"], outs[0]
        assert "another rank failed while writing" in outs[1]["error"], outs[1]
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]

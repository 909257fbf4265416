"""The `model` section: the policy's checkpoint and its architecture (attention, MoE, MLA)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from spec.models.base import NonNegInt, PosFloat, PosInt, Section


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

"""Parameter counts and per-GPU memory estimates: arithmetic on the spec, no torch.

Everything here is a pure function of the architecture and the layout. `compiler.plan`
calls these once; checks and `rlspec inspect` read the results from the Plan.

Parameter counts (norms and biases ignored, they are < 0.1 % of any model here):

- GQA attention, per layer, with head dim d (default hidden / heads), a heads, g KV heads:
  q = h·a·d, k = v = h·g·d, o = a·d·h  →  2·h·a·d + 2·h·g·d.
- MLA attention (DeepSeek-V2/V3), per layer, with q_lora_rank r_q, kv_lora_rank r_kv,
  qk_head_dim d_n, qk_pos_emb_head_dim d_r, v_head_dim d_v:
  q: h·r_q + r_q·a·(d_n + d_r)  (or h·a·(d_n + d_r) without q compression);
  kv_a: h·(r_kv + d_r); kv_b: r_kv·a·(d_n + d_v); o: a·d_v·h.
- SwiGLU FFN of width f: 3·h·f (gate, up, down). Dense layers (a dense model, or the first
  `moe.first_dense_layers` of an MoE) use `ffn_hidden_size`.
- MoE layer: E routed experts of 3·h·f_e, shared experts 3·h·f_s
  (f_s = shared_expert_ffn_hidden_size or shared_experts·f_e), router h·E.
- Embedding V·h; output layer V·h unless tied.
  active = everything but the routed experts + top_k routed experts per MoE layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spec.models import Architecture

GB = 1e9  # memory is reported in GB = 10^9 bytes, as cluster.gpu_memory_gb is


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of the policy, in parameters (not bytes)."""

    total: int
    active: int  # per token: non-expert + shared + top_k routed experts
    embedding: int  # input embedding + output layer (once if tied)
    non_expert: int  # everything not inside routed experts (incl. embedding, shared experts)
    expert: int  # all routed experts of all MoE layers
    moe_layers: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, in GB (10^9), with the capacity they are compared against."""

    parts: dict[str, float]  # e.g. {"weights": .., "grads": .., "optimizer": .., "activations": ..}
    total_gb: float
    capacity_gb: float
    notes: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.total_gb / self.capacity_gb


@dataclass(frozen=True)
class LayerShape:
    """Parameters of one transformer layer, split the way the parallel grids split them."""

    attention: int  # attention block (TP-sharded)
    dense_ffn: int  # FFN of a dense layer (TP-sharded)
    moe_shared: int  # shared experts + router of an MoE layer (TP-sharded, not expert-parallel)
    expert: int  # one routed expert (ETP·EP-sharded)
    num_experts: int
    top_k: int
    first_dense: int  # leading dense layers (all layers for a dense model)


def head_dim(arch: Architecture) -> int:
    """Per-head dimension: `head_dim`, else hidden_size // num_attention_heads."""
    return arch.head_dim or arch.hidden_size // arch.num_attention_heads


def kv_heads(arch: Architecture) -> int:
    """KV heads of a GQA model (num_query_groups, default: one per attention head)."""
    return arch.num_query_groups or arch.num_attention_heads


def attention_params(arch: Architecture) -> int:
    """Attention parameters of one layer (GQA or MLA, formulas in the module docstring)."""
    h, a = arch.hidden_size, arch.num_attention_heads
    if arch.attention == "mla" and arch.mla is not None:
        m = arch.mla
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        q = h * m.q_lora_rank + m.q_lora_rank * a * qk if m.q_lora_rank else h * a * qk
        kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank * a * (
            m.qk_head_dim + m.v_head_dim
        )
        return q + kv + a * m.v_head_dim * h
    d, g = head_dim(arch), kv_heads(arch)
    return 2 * h * a * d + 2 * h * g * d


def layer_shape(arch: Architecture) -> LayerShape:
    """Per-layer parameter groups of the architecture."""
    h = arch.hidden_size
    moe = arch.moe
    if moe is None:
        return LayerShape(attention_params(arch), 3 * h * arch.ffn_hidden_size, 0, 0, 0, 0,
                          arch.num_layers)
    shared = 0
    if moe.shared_experts:
        shared = 3 * h * (moe.shared_expert_ffn_hidden_size
                          or moe.shared_experts * moe.expert_ffn_hidden_size)
    return LayerShape(
        attention=attention_params(arch),
        dense_ffn=3 * h * arch.ffn_hidden_size,
        moe_shared=shared + h * moe.num_experts,  # + router
        expert=3 * h * moe.expert_ffn_hidden_size,
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        first_dense=moe.first_dense_layers,
    )


def count_params(arch: Architecture) -> ParamCount:
    """Total / active / expert / non-expert parameter counts of the policy."""
    s = layer_shape(arch)
    dense_layers = min(s.first_dense, arch.num_layers)
    moe_layers = arch.num_layers - dense_layers
    embedding = arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    expert = moe_layers * s.num_experts * s.expert
    non_expert = (embedding + arch.num_layers * s.attention + dense_layers * s.dense_ffn
                  + moe_layers * s.moe_shared)
    return ParamCount(
        total=non_expert + expert,
        active=non_expert + moe_layers * s.top_k * s.expert,
        embedding=embedding,
        non_expert=non_expert,
        expert=expert,
        moe_layers=moe_layers,
    )


# --------------------------------------------------------------------------- trainer memory


@dataclass(frozen=True)
class TrainLayout:
    """What the trainer memory model needs of the layout (resolved, all ≥ 1)."""

    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    vpp: int
    sequence_parallel: bool
    pipeline_layers: tuple[int, ...]
    micro_batches: int  # per optimizer step, per data-parallel rank
    micro_batch_size: int
    seq_len: int
    precision: str  # bf16 | fp32
    recompute: str  # none | selective | full
    distributed_optimizer: bool
    # Attention the trainer builds (runtime.capabilities.TRAINER_ATTENTION): "local" is
    # megatron-core's unfused DotProductAttention, which materialises the score matrix;
    # "sdpa" (torch's fused attention, the Megatron trainer's) and "flash" never store it.
    attention: str = "flash"
    heads: int = 1  # attention heads of the model (split over TP)
    # Fraction of the optimizer state the hybrid CPU optimizer keeps in host memory
    # (train.optimizer.cpu_offload / offload_fraction; 0 = all on the GPU).
    optimizer_offload: float = 0.0


# Bytes per parameter of a Megatron-core trainer (Megatron-LM docs, "Distributed Optimizer":
# bf16 params with fp32 main grads: 2 + 4 bytes, plus 12 for fp32 master weights + Adam m, v,
# the 12 sharded over data-parallel ranks by the distributed optimizer; fp32 params: 4 + 4 + 8).
_BYTES = {"bf16": (2, 4, 12), "fp32": (4, 4, 8)}
_LOGIT_BYTES = 4  # fp32 logits of the last stage (log-probs and entropies are taken in fp32)
# Optimizer CPU offload (megatron-core's HybridDeviceOptimizer inside the distributed
# optimizer, without the precision-aware optimizer, which needs TransformerEngine): the GPU
# keeps the fp32 main-weight shards (4 B of bf16's 12) and loses the offloaded share of Adam's
# m and v (8 B); the host holds, per offloaded parameter, an fp32 copy of the main weight, an
# fp32 copy of its gradient, and m and v.
_MOMENT_BYTES = 8
_HOST_BYTES = 16
# megatron-core 0.16.1 local DotProductAttention, bytes per score element [b, a/t, s/c, s]:
# (kept for the backward pass, peak working set of the layer being computed), by precision.
# bf16: kept = the fp32 softmax output (4, softmax in fp32 is TransformerConfig's default)
# + its bf16 copy that multiplies V (2); working = the persistent "mpu" global buffer the
# scores are written through (2) + the bf16 scores (2) + their fp32 copy, masked in place (4)
# + the softmax (4) + its bf16 copy (2). fp32: kept = the softmax (4; the same tensor
# multiplies V); working = buffer (4) + scores, masked in place (4) + softmax (4).
# Attention dropout is 0 in the Megatron trainer, so no dropout mask is kept.
_LOCAL_ATTENTION_BYTES = {"bf16": (6, 14), "fp32": (4, 12)}
_SCORE_BYTES = {"bf16": 2, "fp32": 4}


def activation_bytes_per_layer(
    s: int, b: int, h: int, tp: int, cp: int, sequence_parallel: bool, recompute: str
) -> float:
    """Activation bytes one layer keeps for one micro-batch until its backward pass.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models" (arXiv 2205.05198), bf16 activations, s tokens, b sequences, width h, TP t:
    - no / selective recompute: 34·s·b·h/t with sequence parallelism, s·b·h·(10 + 24/t)
      without (LayerNorm/dropout inputs are then replicated on every TP rank): everything but
      the paper's 5·a·s²·b/t attention scores (its selective-recompute figure). The scores are
      counted apart (:func:`local_attention_bytes`), for local attention only: SDPA / flash
      attention never stores them (it keeps the output, counted here, and a per-row fp32
      log-sum-exp, 4·a·s·b/t B, under 0.1 % of this).
    - full recompute: only the layer input, 2·s·b·h (divided by t with sequence parallelism).
    Context parallelism shards the sequence: everything is divided by CP.
    MoE layers are counted as dense blocks (a top-k·f_e-wide MLP is 2-3·h for the models here,
    close to the paper's 4·h); dispatch buffers are not modelled.
    """
    sbh = s * b * h
    if recompute == "full":
        per = 2 * sbh / (tp if sequence_parallel else 1)
    elif sequence_parallel:
        per = 34 * sbh / tp
    else:
        per = sbh * (10 + 24 / tp)
    return per / cp


def attention_score_elements(s: int, b: int, heads: int, tp: int, cp: int) -> float:
    """Elements of one layer's attention score matrix on one GPU: b · (a / TP) · (s / CP) · s
    (each rank attends its s/CP queries to all s keys)."""
    return b * heads / max(1, tp) * s / max(1, cp) * s


def local_attention_bytes(s: int, b: int, heads: int, tp: int, cp: int,
                          precision: str) -> tuple[float, float]:
    """(kept, working) bytes of megatron-core's local attention for one layer, one micro-batch.

    ``kept``: what the layer keeps for its backward pass when core attention is not
    recomputed (train.recompute none); ``working``: its peak while the layer's attention runs
    (forward, or the recomputation in the backward pass). Per element of
    :func:`attention_score_elements`, see ``_LOCAL_ATTENTION_BYTES``: 6 and 14 B in bf16, so
    at 10,240 tokens × 32 heads (TP 1, one sequence) the bf16 score matrix alone is 6.7 GB,
    20 GB are kept per layer without recomputation and 47 GB are needed while it runs.
    """
    kept, working = _LOCAL_ATTENTION_BYTES.get(precision, _LOCAL_ATTENTION_BYTES["bf16"])
    elements = attention_score_elements(s, b, heads, tp, cp)
    return kept * elements, working * elements


def train_memory(arch: Architecture, layout: TrainLayout, capacity_gb: float) -> MemoryEstimate:
    """Peak memory of one trainer GPU: the worst pipeline stage of the Megatron-core layout.

    For pipeline stage i holding n_i layers (embedding on the first stage, output layer on
    the last; a tied embedding is kept on both ends when PP > 1, as Megatron does):
      P_i      = non-expert params / TP  +  routed-expert params / (ETP·EP)
      weights  = P_i · (2 B bf16 | 4 B fp32)
      grads    = P_i · 4 B (fp32 main grads; Megatron accumulates bf16 runs in fp32)
      optimizer= 12 B/param bf16 (fp32 master + Adam m + v) | 8 B fp32 (m + v), divided by
                 DP·CP for non-expert params and by expert-DP for expert params when the
                 optimizer is distributed (Megatron shards over the data-parallel group with
                 context parallelism, and experts over the expert-data-parallel group)
      activations = n_i · in_flight_i · activation_bytes_per_layer(...)
                 (+ one layer's full working set while it is recomputed, under full recompute)
                 (+ fp32 logits s·b·V·4 B/(TP·CP) on the last stage)
      attention  = with local (unfused) attention (megatron-core's DotProductAttention,
                 what the Megatron trainer built before its SDPA core attention), the score
                 matrices of :func:`local_attention_bytes`:
                 n_i · in_flight_i · kept (recompute none only: selective recompute
                 recomputes core attention, full recompute the whole layer)
                 + working − kept (none) | working (selective, full) for the layer running
                 + the boolean attention mask b·s² B per micro-batch in flight.
                 With SDPA (the Megatron trainer's core attention, runtime.megatron.attention)
                 or flash attention this part is absent: on GPUs the flash / memory-efficient
                 kernels keep no score matrix, 0 B per score element kept or at peak, and the
                 trainer's right-padded batches pass no mask (causal attention), except
                 under CP > 1: one causal mask of the local rows over all keys, s²/CP ·
                 (1 + activation bytes), boolean and additive (runtime.megatron.context_parallel,
                 shared by all layers). On the CPU
                 SDPA's math backend does materialise the scores; the estimate is for GPUs.
      in_flight_i = min(PP − i, micro-batches): the 1F1B schedule keeps PP − i micro-batches
                 in flight on stage i (Narayanan et al. 2021); the interleaved schedule
                 multiplies this by 1 + (PP − 1)/(PP·VPP) (Korthikanti et al. §4.2.3).
    With optimizer CPU offload (train.optimizer.cpu_offload: Megatron
    `--optimizer-cpu-offload --optimizer-offload-fraction f`) the GPU keeps its fp32
    main-weight shards and (1 − f) of Adam's m and v: optimizer = (12 − 8·f) B per sharded
    bf16 parameter, (8 − 8·f) fp32; the host keeps the offloaded parameters' fp32 main
    weights, fp32 gradient copies and m, v (16 B per parameter, in the notes). Without it,
    `compiler.checks` reports an estimate over capacity as an error only when it is over
    without the optimizer state (offloading it would fit), else as a warning.
    """
    s = layer_shape(arch)
    h, vocab = arch.hidden_size, arch.vocab_size
    w_b, g_b, o_b = _BYTES.get(layout.precision, _BYTES["bf16"])
    pp = max(1, len(layout.pipeline_layers))
    tp, cp = max(1, layout.tp), max(1, layout.cp)
    expert_shards = max(1, layout.etp * layout.ep)
    dense_dp = max(1, layout.dp * cp)
    expert_dp = max(1, layout.expert_dp)
    tokens = layout.seq_len
    per_layer = activation_bytes_per_layer(
        tokens, layout.micro_batch_size, h, tp, cp, layout.sequence_parallel, layout.recompute
    )
    working = (activation_bytes_per_layer(tokens, layout.micro_batch_size, h, tp, cp,
                                          layout.sequence_parallel, "selective")
               if layout.recompute == "full" else 0.0)
    interleave = 1 + (pp - 1) / (pp * layout.vpp) if layout.vpp > 1 else 1.0
    m = max(1, layout.micro_batches)
    b = layout.micro_batch_size
    local = layout.attention == "local"
    attn_kept, attn_working = (local_attention_bytes(tokens, b, layout.heads, tp, cp,
                                                     layout.precision)
                               if local else (0.0, 0.0))
    if layout.recompute == "none":
        attn_running = attn_working - attn_kept
    else:  # core attention (selective) or the whole layer (full) is recomputed
        attn_kept, attn_running = 0.0, attn_working
    mask = b * tokens * tokens / cp if local else 0.0
    # SDPA under CP > 1: one causal mask of the local rows, boolean + additive (activation
    # dtype), shared by every layer and micro-batch of a length (runtime.megatron.context_parallel)
    cp_mask = tokens * tokens / cp * (1 + w_b) if layout.attention == "sdpa" and cp > 1 else 0.0
    offload = min(1.0, max(0.0, layout.optimizer_offload))
    host = 0.0

    best: tuple[float, int, dict[str, float]] | None = None
    start = 0
    for i, n in enumerate(layout.pipeline_layers):
        n = max(0, n)
        end = min(start + n, arch.num_layers)
        dense = max(0, min(end, s.first_dense) - start) if end > start else 0
        moe = max(0, end - start - dense)
        start += n
        non_expert = n * s.attention + dense * s.dense_ffn + moe * s.moe_shared
        if i == 0:
            non_expert += vocab * h
        if i == pp - 1 and (not arch.tie_embeddings or pp > 1):
            non_expert += vocab * h
        expert = moe * s.num_experts * s.expert
        p_ne, p_e = non_expert / tp, expert / expert_shards
        sharded = p_ne / dense_dp + p_e / expert_dp if layout.distributed_optimizer else p_ne + p_e
        opt = (o_b - _MOMENT_BYTES * offload) * sharded
        in_flight = min(pp - i, m) * interleave
        act = n * in_flight * per_layer + (working if n else 0.0)
        if i == pp - 1:
            act += tokens * layout.micro_batch_size * vocab * _LOGIT_BYTES / (tp * cp)
        parts = {
            "weights": w_b * (p_ne + p_e) / GB,
            "grads": g_b * (p_ne + p_e) / GB,
            "optimizer": opt / GB,
            "activations": act / GB,
        }
        if local:
            attn = (n * in_flight * attn_kept + attn_running + in_flight * mask) if n else 0.0
            parts["attention"] = attn / GB
        elif cp_mask and n:
            parts["attention"] = cp_mask / GB
        total = sum(parts.values())
        if best is None or total > best[0]:
            best = (total, i, parts, _HOST_BYTES * sharded * offload)
    assert best is not None  # pipeline_layers always has PP ≥ 1 entries
    total, stage, parts, host = best
    notes = [f"worst pipeline stage: {stage} of {pp} ({layout.pipeline_layers[stage]} layers)"]
    notes.append(f"recompute {layout.recompute}: "
                 f"{per_layer / GB:.3f} GB per layer per micro-batch in flight")
    if local:
        scores = _SCORE_BYTES.get(layout.precision, 2) * attention_score_elements(
            tokens, b, layout.heads, tp, cp)
        kept = ("kept per layer in flight" if layout.recompute == "none" else
                "recomputed, not kept")
        notes.append(f"local attention (megatron-core DotProductAttention, no flash attention): "
                     f"{scores / GB:.2f} GB score matrix per layer per micro-batch "
                     f"[{b}, {layout.heads / tp:g} heads, {tokens // cp}, {tokens}], "
                     f"{kept}; {attn_working / GB:.2f} GB while a layer's attention runs")
    elif layout.attention == "sdpa":
        notes.append("core attention: torch SDPA (flash / memory-efficient kernels): no score "
                     "matrix, no mask for right-padded batches")
    if offload:
        notes.append(f"optimizer CPU offload {offload:g}: {host / GB:.1f} GB of optimizer state "
                     "per GPU in host memory (fp32 weights, gradients, Adam m and v)")
    if not layout.distributed_optimizer:
        notes.append("optimizer not distributed: full optimizer state on every rank")
    return MemoryEstimate(parts=parts, total_gb=total, capacity_gb=capacity_gb, notes=tuple(notes))


# --------------------------------------------------------------------------- rollout memory


def kv_bytes_per_token(arch: Architecture, tp: int) -> int:
    """KV-cache bytes per token on one GPU of a vLLM tensor-parallel group (bf16 cache).

    GQA: 2 (K and V) · layers · ceil(kv_heads / TP) · head_dim · 2 B — vLLM shards KV heads
    over TP and replicates them when kv_heads < TP (one head per GPU).
    MLA: (kv_lora_rank + qk_pos_emb_head_dim) · layers · 2 B — the compressed latent is
    replicated on every TP rank.
    """
    if arch.attention == "mla" and arch.mla is not None:
        return (arch.mla.kv_lora_rank + arch.mla.qk_pos_emb_head_dim) * arch.num_layers * 2
    per_gpu = max(1, math.ceil(kv_heads(arch) / max(1, tp)))
    return 2 * arch.num_layers * per_gpu * head_dim(arch) * 2


def rollout_memory(
    arch: Architecture,
    params: ParamCount,
    *,
    tp: int,
    dp: int,
    expert_parallel: bool,
    redundant_experts: int,
    fp8: bool,
    seq_len: int,
    gpu_memory_gb: float,
    utilization: float,
) -> tuple[MemoryEstimate, int]:
    """Memory of one vLLM GPU, and how many full-length sequences one engine replica holds.

    weights = (non-expert params / TP + expert params · (E + R) / E / (TP·DP with expert
              parallelism, else TP)) · (2 B bf16 | 1 B fp8; embeddings stay bf16 under fp8, as
              vLLM keeps them); R redundant experts (EPLB) are full copies of routed experts.
    kv_cache_one_sequence = kv_bytes_per_token · seq_len (one sequence of the longest length)
    capacity = gpu_memory_gb · gpu_memory_utilization (what vLLM allots itself).
    Sequences that fit = floor((capacity − weights) / one sequence) per TP group, × DP (each
    attention data-parallel rank keeps its own cache). CUDA graphs and the profiling peak
    (a few GB) are not modelled.
    """
    tp, dp = max(1, tp), max(1, dp)
    expert_shards = tp * dp if expert_parallel else tp
    dense = params.non_expert / tp
    moe = arch.moe
    replicated = (moe.num_experts + redundant_experts) / moe.num_experts if moe else 1.0
    experts = params.expert * replicated / expert_shards
    if fp8:
        emb = params.embedding / tp
        weights = 2 * emb + 1 * (dense - emb + experts)
    else:
        weights = 2 * (dense + experts)
    kv_seq = kv_bytes_per_token(arch, tp) * seq_len
    capacity = gpu_memory_gb * utilization
    free = capacity * GB - weights
    per_group = int(free // kv_seq) if free > 0 and kv_seq > 0 else 0
    sequences = per_group * dp
    parts = {"weights": weights / GB, "kv_cache_one_sequence": kv_seq / GB}
    notes = (
        f"{sequences} full-length sequences ({seq_len} tokens) fit in the KV cache of one "
        f"replica ({kv_seq / 1e6:.1f} MB each per GPU)",
        f"capacity = {gpu_memory_gb:g} GB × gpu_memory_utilization {utilization:g}",
    )
    return (MemoryEstimate(parts=parts, total_gb=sum(parts.values()), capacity_gb=capacity,
                           notes=notes), sequences)

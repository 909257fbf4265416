"""The Megatron trainer's core attention: torch ``scaled_dot_product_attention`` (SDPA).

megatron-core 0.16.1's local (non-TransformerEngine) layer spec computes core attention with
``DotProductAttention``, which materialises the [b, heads, s, s] score matrix and keeps the
softmax for the backward pass (≈ 6 B per score element kept in bf16, 14 B at its peak: 65 GB
of scores per layer at 33k tokens × 128 heads). :class:`SDPAttention` is a drop-in for that
``core_attention`` submodule, self-attention and MLA alike (:func:`sdpa_layer_spec` puts it in
the ModuleSpec tree), computing the same function with torch's fused kernels:

- the constructor takes ``DotProductAttention``'s arguments and MLA's ``k_channels`` /
  ``v_channels``; ``forward(query [sq, b, np, hn], key [sk, b, ng, hn], value [sk, b, ng, hv],
  attention_mask)`` returns [sq, b, np · hv], like the local one;
- softmax scale: ``softmax_scale`` when given (``config.softmax_scale`` for self-attention;
  MLA passes mscale² / √(q head dim)), else 1 / √kv_channels (√k_channels). The local module
  divides its scores by the layer number under ``apply_query_key_layer_scaling`` and
  multiplies them back inside the softmax: the effective scale, the one used here, is the
  same. SDPA's kernels (flash, memory-efficient, cuDNN) always accumulate the softmax in fp32,
  i.e. ``attention_softmax_in_fp32`` (which megatron forces on with the layer scaling);
- masks: ``attention_mask`` is megatron's boolean mask, True = masked, broadcast over heads
  ([b, 1, sq, sk]). Without one and with ``attn_mask_type`` causal (what the GPT layer spec
  builds) the call is ``is_causal=True`` with no mask, the case flash attention takes (the
  local module builds the same causal mask). With one, it is turned once per mask tensor (a
  weak cache shared by every layer, so the backward keeps one copy, not one per layer) into
  an additive float mask of the query's dtype (0 / −inf) that SDPA's memory-efficient kernel
  takes without copying it again (its rows start 16-element aligned). A row whose keys are all
  masked (a left-padded position) is the mean of the values: the local module fills masked
  scores with −10000, so such a row's softmax is uniform over all keys (SDPA would give 0 or
  NaN; the row is unmasked for the kernel and its output replaced). Every other row is equal:
  exp(−10000 − max) is 0 in fp32 as exp(−inf) is;
- GQA: without a mask ``enable_gqa=True`` (flash reads each KV head for its query heads);
  with a mask the keys and values are repeated per query head first (``repeat_interleave``
  on the head dim, as the local module does), since not every backend that takes a mask
  takes grouped heads.

Not supported (refused when the module is built or called, as the local module refuses most
of them): attention dropout > 0 (the Megatron trainer sets 0), sliding-window layers,
``softmax_type`` other than vanilla, attention bias, packed sequences.

Context parallelism (``runtime.megatron.context_parallel``): each CP rank holds chunks r and
2·CP−1−r of the sequence; K and V are all-gathered over the CP group in global order (the
backward a reduce-scatter), and the local queries attend with a mask of global positions
(causal: ``context_parallel.causal_mask``; a given megatron mask arrives with its rows
restricted to the local queries), i.e. full causal attention restricted to the local rows.
Under CP the call always takes the masked path (no ``is_causal`` flash case). ``cp_comm_type``
(p2p ring, a2a, ...) is not read: the function is the same, computed this way.

On the CPU SDPA runs its math backend, which does materialise the scores (tests only); the
memory estimate (``compiler.estimates``, ``runtime.capabilities.TRAINER_ATTENTION``) is for
GPUs, where flash / memory-efficient attention keep only the output and the per-row
log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from runtime.megatron import context_parallel

__all__ = ["SDPAttention", "additive_mask", "sdpa_layer_spec"]

# SDPA's memory-efficient kernel wants the mask's row stride a multiple of its alignment
# (it pads a misaligned mask, a fresh copy per call, otherwise).
_ALIGN = 16

# boolean megatron mask (by identity) → (its version, {dtype: additive mask}); entries go
# with the mask.
_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def additive_mask(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """megatron's boolean mask (True = masked) as SDPA's additive float mask (0 / −inf) of
    ``dtype``, fully masked rows unmasked, and those rows ([.., sq, 1], True = fully masked;
    None when there are none), module doc. One pair per (mask, dtype): every layer of a
    forward pass gets (and its backward keeps) the same tensors."""
    version, per_dtype = _MASKS.get(mask, (None, None))
    if per_dtype is None or version != mask._version:  # new, or changed in place
        per_dtype = {}
        _MASKS[mask] = (mask._version, per_dtype)
    got = per_dtype.get(dtype)
    if got is None:
        masked = mask.bool()
        dead = masked.all(dim=-1, keepdim=True)
        masked = masked & ~dead
        sk = masked.shape[-1]
        width = -(-sk // _ALIGN) * _ALIGN
        buf = torch.zeros(*masked.shape[:-1], width, dtype=dtype, device=mask.device)
        additive = buf[..., :sk]
        additive.masked_fill_(masked, float("-inf"))
        got = per_dtype[dtype] = (additive, dead if bool(dead.any()) else None)
    return got


class SDPAttention(MegatronModule):
    """megatron-core's ``core_attention`` computed by ``F.scaled_dot_product_attention``
    (module doc): the constructor and forward contract of ``DotProductAttention``."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, k_channels: int | None = None,
                 v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection: ProcessGroupCollection | None = None) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError(f"attention dropout {dropout}: the Megatron trainer's "
                                      "SDPA core attention runs without dropout (set 0)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"softmax_type {config.softmax_type!r}: SDPA has no "
                                      "softmax offset")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            raise NotImplementedError("sliding-window attention layers are not supported")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        head_dim = k_channels or config.kv_channels
        # the effective scale of the local module (its layer scaling cancels out)
        self.softmax_scale = (1.0 / math.sqrt(head_dim) if softmax_scale is None
                              else float(softmax_scale))

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: Tensor | None = None, packed_seq_params: Any = None) -> Tensor:
        """query [sq, b, np, hn], key [sk, b, ng, hn], value [sk, b, ng, hv], attention_mask
        boolean (True = masked) or None → [sq, b, np · hv]. Like the local module, the mask
        type is the one the module was built with (``attn_mask_type`` is not used)."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by SDPAttention")
        if attention_bias is not None:
            raise NotImplementedError("attention bias is not supported by SDPAttention")
        sq, b, heads, _ = query.shape
        groups = heads // key.shape[2]
        causal = False
        mask = dead = None
        if context_parallel.size() > 1:  # whole-sequence K / V, causal by global position
            key, value = context_parallel.gather_sequence(key), context_parallel.gather_sequence(value)
            if attention_mask is None and self.attn_mask_type == AttnMaskType.causal:
                attention_mask = context_parallel.causal_mask(sq, query.device)
        if attention_mask is not None:
            mask, dead = additive_mask(attention_mask, query.dtype)
            if groups > 1:
                key = key.repeat_interleave(groups, dim=2)
                value = value.repeat_interleave(groups, dim=2)
                groups = 1
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq != key.shape[0]:
                raise ValueError("a causal mask is only for self-attention (sq == sk)")
            causal = True
        # [s, b, n, d] → [b, n, s, d] (a view; the last dim stays contiguous)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             scale=self.softmax_scale, enable_gqa=groups > 1)
        if dead is not None:  # fully masked rows: uniform over the keys, as the local module
            out = torch.where(dead, v.mean(dim=2, keepdim=True), out)
        # [b, np, sq, hv] → [sq, b, np · hv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * out.shape[-1])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """No parameters (vanilla softmax): nothing to checkpoint."""
        return {}


def sdpa_layer_spec(spec: Any) -> Any:
    """``spec`` (a ModuleSpec tree of dataclasses) with every local core attention
    (``DotProductAttention`` and subclasses, e.g. MLA's) → :class:`SDPAttention`."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if isinstance(spec, type) and issubclass(spec, DotProductAttention):
        return SDPAttention
    if isinstance(spec, list | tuple):
        return type(spec)(sdpa_layer_spec(s) for s in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: sdpa_layer_spec(getattr(spec, f.name))
                                            for f in dataclasses.fields(spec) if f.init})
    return spec

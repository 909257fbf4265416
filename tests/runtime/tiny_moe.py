"""The tiny Qwen3-MoE checkpoint the rollout tests serve (tests/runtime/conftest.py's
fixtures, test_rollout.py): its config, its weights for a seed, its character tokenizer; and
what the weight-update tests send (tensors of every kind) and sample with."""

from __future__ import annotations

from pathlib import Path

import tokenizers
import torch
import transformers

VOCAB = 64
EOS = 1

# Tensors a weight update must carry bit-exact: dtypes, a view, a 0-dim and an empty one.
MIXED_TENSORS = [
    ("model.embed_tokens.weight", torch.randn(10, 4).to(torch.bfloat16)),
    ("model.layers.0.mlp.experts.3.down_proj.weight", torch.randn(6, 4).half().t()),  # a view
    ("model.norm.weight", torch.randn(3)),
    ("positions", torch.arange(5)),
    ("scale", torch.tensor(0.5)),
    ("empty", torch.zeros(0, 4)),
    ("last", torch.randn(7, dtype=torch.float64)),
]
PROMPTS = [[5, 9, 12], [3, 4, 5, 6, 7, 8, 9], [2]]
SAMPLING = {"max_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True}


def tiny_moe_config() -> transformers.Qwen3MoeConfig:
    """The tiny Qwen3-MoE. initializer_range 0.2 (not 0.02) gives peaked logits and clearly
    separated router scores, so sampling and routing are not near-uniform."""
    return transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.2,
        eos_token_id=EOS, pad_token_id=0,
    )  # fmt: skip


def save_tiny_moe(path: Path, seed: int) -> None:
    """The tiny Qwen3-MoE with the weights of ``seed``, as an HF folder."""
    torch.manual_seed(seed)
    transformers.Qwen3MoeForCausalLM(tiny_moe_config()).save_pretrained(path)


def save_tokenizer(path: Path) -> None:
    """A character-level tokenizer of the tiny model's vocabulary."""
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."
    vocab = {"<pad>": 0, "<eos>": EOS, "<unk>": 2}
    for ch in chars[: VOCAB - len(vocab)]:
        vocab[ch] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), "isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(path)

"""The embedded policy: character tokenizer, Qwen3-MoE built from the tiny spec, save/load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import yaml

from runtime.jobs.common import COMPLETE_MARKER
from runtime.policy import (
    CHARACTERS,
    SPECIAL_TOKENS,
    build_policy,
    build_tokenizer,
    count_parameters,
    load_policy,
    policy_config,
    save_policy,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def arch() -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "examples" / "tiny" / "spec.yaml").read_text())
    return spec["model"]["architecture"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(64, model_max_length=256)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_round_trip(tokenizer: Any) -> None:
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert [tokenizer.convert_tokens_to_ids(c) for c in CHARACTERS] == list(range(4, 19))
    assert len(tokenizer) == 19
    ids = tokenizer.encode("37+58=")
    assert ids == [7, 11, 14, 9, 12, 17]  # one id per character, no BOS/EOS added
    for text in ["37+58=", "-21", "12*34= 408", "0-999=-999", " "]:
        enc = tokenizer.encode(text)
        assert len(enc) == len(text)
        assert tokenizer.decode(enc) == text
    assert tokenizer.decode([*tokenizer.encode("95"), tokenizer.eos_token_id],
                            skip_special_tokens=True) == "95"
    assert tokenizer.decode([12, 50, 63], skip_special_tokens=True) == "8"  # unused ids: nothing
    assert tokenizer.encode("a7") == [3, 11]  # unknown characters → <unk>


def test_tokenizer_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="needs 19 ids"):
        build_tokenizer(18)


def test_tokenizer_reloads_with_autotokenizer(tokenizer: Any, tmp_path: Path) -> None:
    from runtime.policy import save_tokenizer

    save_tokenizer(tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("37+58=") == tokenizer.encode("37+58=")
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0
    assert loaded.decode(loaded.encode("12-345=-333")) == "12-345=-333"
    batch = loaded(["1+1=", "12+34="], padding=True)
    assert [len(x) for x in batch["input_ids"]] == [6, 6]


# --------------------------------------------------------------------------- model


def test_config_mapping(arch: dict[str, Any], tokenizer: Any) -> None:
    cfg = policy_config(arch, tokenizer)
    assert isinstance(cfg, transformers.Qwen3MoeConfig)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 128, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 64)
    assert cfg.norm_topk_prob is True and cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1
    assert cfg.rope_parameters["rope_theta"] == 1_000_000.0 and cfg.vocab_size == 64
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert cfg.tie_word_embeddings is False

    dense_first = {**arch, "num_layers": 3, "moe": {**arch["moe"], "first_dense_layers": 1}}
    assert policy_config(dense_first, tokenizer).mlp_only_layers == [0]
    dense = {k: v for k, v in arch.items() if k != "moe"} | {"family": "qwen3"}
    assert isinstance(policy_config(dense, tokenizer), transformers.Qwen3Config)
    llama = policy_config(dense | {"family": "llama"}, tokenizer)
    assert isinstance(llama, transformers.LlamaConfig)
    assert (llama.num_key_value_heads, llama.head_dim, llama.attention_bias) == (2, 32, False)  # the spec's head_dim


def test_glm4_moe_config_mapping(tokenizer: Any) -> None:
    """GLM-4.5: qkv bias, no q/k norm, RoPE on half of each head unless the spec says
    otherwise, DeepSeek-V3's MoE fields; the model rotates exactly head_dim × factor dims."""
    from tests.families import tiny_glm_arch

    arch = tiny_glm_arch(groups=True)
    cfg = policy_config(arch, tokenizer)
    assert isinstance(cfg, transformers.Glm4MoeConfig)
    assert cfg.attention_bias is True and cfg.use_qk_norm is False
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)
    assert (cfg.n_shared_experts, cfg.first_k_dense_replace, cfg.routed_scaling_factor) == (1, 1, 2.5)
    assert (cfg.n_group, cfg.topk_group, cfg.num_nextn_predict_layers) == (4, 1, 0)
    quarter = policy_config({**arch, "partial_rotary_factor": 0.25}, tokenizer)
    assert quarter.rope_parameters["partial_rotary_factor"] == 0.25
    model = build_policy({**arch, "partial_rotary_factor": 0.25}, tokenizer, seed=0)
    assert isinstance(model, transformers.Glm4MoeForCausalLM)
    assert model.model.rotary_emb.inv_freq.numel() == 2  # 16 · 0.25 = 4 dims, 2 frequencies
    assert not hasattr(model.model.layers[0].self_attn, "q_norm")  # GLM-4.5-Air's
    normed = build_policy({**arch, "qk_norm": True}, tokenizer, seed=0)  # GLM-4.5's
    assert normed.config.use_qk_norm and normed.model.layers[0].self_attn.q_norm.weight.numel() == 16


@pytest.mark.parametrize(("edit", "message"), [
    ({"family": "mixtral"}, "not supported by the embedded engine"),
    ({"family": "glm4_moe"}, "GLM-4.5 routes with sigmoid"),
    ({"family": "llama"}, "family llama is dense"),
    ({"partial_rotary_factor": 0.5}, "applies to glm4_moe only"),
    ({"qk_norm": False}, "qk_norm False applies to glm4_moe only"),
    ({"moe": None}, "needs a model.architecture.moe"),
    ({"family": "qwen3"}, "family qwen3 is dense"),
    ({"vocab_size": 16}, "smaller than the tokenizer"),
    ({"moe": {"num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 64,
              "score_function": "sigmoid"}}, "softmax"),
    ({"moe": {"num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 64,
              "shared_experts": 1}}, "shared experts"),
])
def test_config_rejects(arch: dict[str, Any], tokenizer: Any, edit: dict[str, Any],
                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy_config({**arch, **edit}, tokenizer)


def test_tiny_policy_size_forward_and_determinism(arch: dict[str, Any], tokenizer: Any) -> None:
    model = build_policy(arch, tokenizer, seed=1234)
    assert isinstance(model, transformers.Qwen3MoeForCausalLM)
    counts = count_parameters(model)
    print("tiny policy parameters:", counts)
    # embed 64·128 + lm_head 64·128 + final norm 128
    # + 2 layers × (q 128·128 + k 128·64 + v 128·64 + o 128·128 (head_dim 32) + q/k norms 2·32
    #               + 2 norms·128 + router 8·128 + 8 experts × (gate+up 2·128·64 + down 64·128))
    per_layer = 16384 + 8192 + 8192 + 16384 + 64 + 256 + 1024 + 8 * (2 * 128 * 64 + 64 * 128)
    assert counts["total"] == 2 * 8192 + 128 + 2 * per_layer == 510_720
    assert counts["expert"] == 2 * 8 * 3 * 128 * 64 == 393_216
    assert counts["active"] == 510_720 - 393_216 * 6 // 8

    ids = torch.randint(0, len(tokenizer), (4, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (4, 20, 64) and torch.isfinite(logits).all()

    state = torch.get_rng_state()
    again = build_policy(arch, tokenizer, seed=1234)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    other = build_policy(arch, tokenizer, seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_save_load_identical_logits(arch: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    model = build_policy(arch, tokenizer, seed=7)
    path = save_policy(model, tokenizer, tmp_path / "ckpt")
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", COMPLETE_MARKER} <= files
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_experts"] == 8
    assert cfg["rope_theta"] == 1_000_000.0
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0

    loaded, tok = load_policy(path)
    assert isinstance(loaded, transformers.Qwen3MoeForCausalLM) and not loaded.training
    # no Hugging Face Hub kernels: on CUDA transformers ≥ 5.25 would fetch them (no network on
    # compute nodes; found on an H200, bench/RESULTS.md §5.1)
    assert not loaded.use_kernels
    assert tok.encode("37+58=") == tokenizer.encode("37+58=")
    ids = torch.randint(0, 19, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)

    # Saving again over a complete checkpoint replaces it in one step.
    other = build_policy(arch, tokenizer, seed=8)
    save_policy(other, tokenizer, path)
    reloaded, _ = load_policy(path)
    assert torch.equal(reloaded.lm_head.weight, other.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]

    bf16, _ = load_policy(path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_a_tied_state_dict_without_its_output_layer_builds_a_tied_policy(
        arch: dict[str, Any], tokenizer: Any) -> None:
    """A Megatron export of a tied model has one embedding tensor and no lm_head.weight:
    ``policy_from_state_dict`` (the Megatron trainer's publish, the to_hf job) builds the
    tied HF model from it; an untied model missing its output layer is still an error."""
    from runtime.policy import policy_from_state_dict

    tied = build_policy({**arch, "tie_embeddings": True}, tokenizer, seed=3)
    weights = {k: v for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    built = policy_from_state_dict(tied.config, weights)
    assert built.lm_head.weight is built.model.embed_tokens.weight
    assert torch.equal(built.lm_head.weight, tied.lm_head.weight)
    untied = build_policy(arch, tokenizer, seed=3)
    with pytest.raises(RuntimeError, match=r"missing \['lm_head.weight'\]"):
        policy_from_state_dict(untied.config, {k: v for k, v in untied.state_dict().items()
                                               if k != "lm_head.weight"})

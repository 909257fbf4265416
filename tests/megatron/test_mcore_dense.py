"""The dense families on megatron-core: Qwen3 (``family: qwen3``: q/k norms) and Llama
(``family: llama``: none), a GPTModel without MoE layers, against HF ``Qwen3ForCausalLM`` /
``LlamaForCausalLM`` of the same weights.

Tolerance: fp32 on CPU, max |Δ logp| ≤ 1e-4 and max |Δ entropy| ≤ 1e-4 (measured ≈ 5e-7 and
1e-6), gradients max |Δ| ≤ 1e-4 · max |g|; the conversion HF → Megatron → HF is exact, bit for
bit; one RL step (two PPO epochs × two optimizer steps) equals the embedded trainer's to
2e-5 (``tests.megatron.test_mcore_trainer``'s check). A dense model has no routers: the
Megatron trainer refuses router replay on it (``runtime.capabilities`` refuses the spec).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.families import tiny_dense_policy
from tests.megatron._match import check_against_hf
from tests.megatron._worker import launch
from tests.megatron.test_mcore_trainer import _check

pytestmark = pytest.mark.megatron
FAMILIES = ["qwen3", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_conversion_round_trip_is_exact(family: str, tie: bool) -> None:
    from runtime.megatron.hf_weights import hf_to_megatron, megatron_to_hf

    hf = tiny_dense_policy(family, tie=tie)
    sd = hf.state_dict()
    full = hf_to_megatron(sd, hf.config)
    assert not any(".router." in k or ".experts." in k for k in full)
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in full) == (family == "qwen3")
    assert ("output_layer.weight" in full) == (not tie)
    back = megatron_to_hf(full, hf.config)
    assert back.keys() == sd.keys() - ({"lm_head.weight"} if tie else set())
    for key, value in back.items():
        assert torch.equal(value, sd[key]), key


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_gradients_and_export_match_hf(tmp_path: Path, family: str) -> None:
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel

    hf = tiny_dense_policy(family)
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg)
        assert model.config.num_moe_experts is None
        assert model.config.qk_layernorm == (family == "qwen3")
        load_hf_weights(model, hf.state_dict(), hf.config)
        check_against_hf(hf, model)
    finally:
        destroy_parallel()


@pytest.mark.parametrize(("family", "loss"), [("qwen3", "espo"), ("llama", "grpo-kl")])
def test_rl_step_matches_embedded(tmp_path: Path, family: str, loss: str) -> None:
    (out,) = launch("tests.megatron._train_worker", 1,
                    ["1", "1", str(tmp_path), "off", loss, f"family={family}"], tmp_path)
    _check(out)


@pytest.mark.usefixtures("megatron_cpu")
def test_router_replay_is_refused_on_a_dense_model(tmp_path: Path) -> None:
    from runtime.megatron.engine import MegatronTrainer
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from tests.megatron._train_worker import ALGO, TRAIN

    hf = tiny_dense_policy("llama")
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        with pytest.raises(ValueError, match="dense: it has no routers to replay"):
            build_gpt_model(hf.config, pg, routing_replay=True)
        model = build_gpt_model(hf.config, pg)
        with pytest.raises(ValueError, match="router replay r3 on a dense model"):
            MegatronTrainer(model, algorithm={**ALGO, "loss": "grpo"}, train=TRAIN,
                            vocab_size=int(hf.config.vocab_size), replay_mode="r3")
    finally:
        destroy_parallel()


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_2_step_matches_embedded(tmp_path: Path, family: str) -> None:
    """TP = 2 (with sequence parallelism) on two ranks: half of every weight and of each
    sequence per rank; the step equals the embedded trainer's."""
    outs = launch("tests.megatron._train_worker", 2,
                  ["2", "1", str(tmp_path), "off", "cispo", f"family={family}"], tmp_path)
    for out in outs:
        _check(out)

"""``train.precision`` on the Megatron train job's GPU path, run on the CPU.

``bf16`` renders ``--bf16``; the train job (``runtime.megatron.setup.build_policy``) then builds
its model in bf16, and ``MegatronTrainer`` accumulates and reduces the gradients in fp32 and
keeps fp32 master weights in the optimizer: Megatron-LM's bf16 recipe (it forces
``--accumulate-allreduce-grads-in-fp32`` with ``--bf16``), and the 2 + 4 + 12 bytes per
parameter that ``compiler.estimates`` counts. ``fp32`` keeps everything in fp32.

The GPU path differs from the CPU one in one call: ``runtime.megatron.parallel.use_devices``,
which on ``cluster.devices: cpu`` forces fp32 and on ``gpu`` leaves the dtype to the flags. The
test takes the GPU branch's answer on the CPU patches (gloo instead of NCCL); the GPU check
(``tools/gpu_check.sh``) runs the same job on a GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.megatron._train_worker import ALGO, EPOCHS, SEED, TOTAL_STEPS, TRAIN, rl_batch
from tests.megatron._worker import tiny_hf_policy
from tests.runtime.test_megatron_args import tiny_megatron_train_sh

pytestmark = pytest.mark.megatron

# a GPU bundle of one rank: the Megatron flags the train job of a GPU run parses
GPU = {"cluster": {"devices": "gpu", "gpus_per_node": 1}, "rollout": {"engine": "vllm"}}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_spec_precision_sets_the_megatron_train_jobs_dtypes(
        tmp_path: Path, megatron_cpu: None, monkeypatch: pytest.MonkeyPatch,
        precision: str) -> None:
    from runtime.megatron import parallel
    from runtime.megatron.args import parse_megatron_args
    from runtime.megatron.engine import MegatronTrainer
    from runtime.megatron.hf_weights import gather_full_state_dict, load_hf_weights, megatron_to_hf
    from runtime.megatron.setup import build_policy
    from runtime.policy import build_tokenizer, save_policy
    from runtime.preflight import trainer_argv
    from runtime.trainer import Trainer

    text, _ = tiny_megatron_train_sh(tmp_path, train={"precision": precision,
                                                      "parallelism": {"expert": 1}},
                                     sections=GPU)
    args = parse_megatron_args(trainer_argv(text))
    assert args.bf16 == (precision == "bf16")
    hf = tiny_hf_policy()
    vocab = int(hf.config.vocab_size)
    save_policy(hf, build_tokenizer(vocab), tmp_path / "policy")
    monkeypatch.setattr(parallel, "use_devices", lambda devices: ("gloo", None))  # GPU branch
    monkeypatch.setenv("RLSPEC_RENDEZVOUS", (tmp_path / "rendezvous").as_uri())
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    policy = build_policy(args, "gpu", str(tmp_path / "policy"), routing_replay=False)
    try:
        assert policy.dtype == dtype
        assert {p.dtype for chunk in policy.chunks for p in chunk.parameters()} == {dtype}
        load_hf_weights(policy.module, hf.state_dict(), hf.config)
        trainer = MegatronTrainer(policy.module, algorithm={**ALGO, "loss": "espo"},
                                  train=TRAIN, vocab_size=vocab,
                                  total_optimizer_steps=TOTAL_STEPS)
        grads = {p.main_grad.dtype for d in trainer.ddp_chunks for p in d.module.parameters()}
        assert grads == {torch.float32}  # accumulated and reduced in fp32 whatever the weights
        master = {p.dtype for group in trainer.optimizer.param_groups for p in group["params"]}
        assert master == {torch.float32}  # Adam steps fp32 master weights
        batch = rl_batch(hf, "off")
        metrics = trainer.step(batch, epochs=EPOCHS, seed=SEED)
        got = megatron_to_hf(gather_full_state_dict(policy.module), hf.config)
    finally:
        parallel.destroy_parallel()

    embedded = copy.deepcopy(hf)  # the same step in fp32
    ref_metrics = Trainer(embedded, algorithm={**ALGO, "loss": "espo"}, train=TRAIN,
                          vocab_size=vocab, total_optimizer_steps=TOTAL_STEPS,
                          ).step(batch, epochs=EPOCHS, seed=SEED)
    ref, start = embedded.state_dict(), hf.state_dict()
    assert {t.dtype for t in got.values()} == {dtype}
    if precision == "fp32":
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 2e-5
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-4)
        return
    # bf16 compute: the same step up to bf16 noise. Adam normalises each element's update,
    # so elements of rounding-level gradient step in noisy directions: the update's cosine to
    # the fp32 one was 0.79 (loss within 0.15 %, grad norm 7 %), a lost or misscaled gradient
    # lands near 0.
    update = torch.cat([(got[k].float() - start[k]).flatten() for k in ref])
    fp32_update = torch.cat([(ref[k] - start[k]).flatten() for k in ref])
    assert torch.nn.functional.cosine_similarity(update, fp32_update, dim=0) > 0.6
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-2)
    assert metrics["entropy"] == pytest.approx(ref_metrics["entropy"], rel=1e-2)
    assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=0.15)


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
def test_a_bf16_model_keeps_its_routers_bias_and_counters_in_fp32(
        tmp_path: Path, megatron_cpu: None, family: str) -> None:
    """The families with a router expert bias (GLM-4.5, DeepSeek-V3): a bf16 model is bf16
    throughout except the routers' bias and token counters, which megatron-core keeps in fp32
    (a bias rounded to bf16 moves the top-k; counts step by 32 in bf16 past 4096); its
    log-probs are the fp32 HF model's up to bf16 noise."""
    from runtime.megatron.hf_weights import load_hf_weights
    from runtime.megatron.logprobs import megatron_logprobs
    from runtime.megatron.model import build_gpt_chunks
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.trainer import sequence_logprobs
    from tests.megatron._train_worker import policy

    hf = policy(family)
    pg = init_parallel(0, 1, tmp_path / "rendezvous")
    try:
        (model,) = build_gpt_chunks(hf.config, pg, dtype=torch.bfloat16)
        load_hf_weights(model, hf.state_dict(), hf.config)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        router = {n: b for n, b in model.named_buffers()
                  if n.endswith(("router.expert_bias", "router.local_tokens_per_expert"))}
        assert {n.rsplit(".", 1)[1] for n in router} == {"expert_bias", "local_tokens_per_expert"}
        assert {b.dtype for b in router.values()} == {torch.float32}
        ids = torch.randint(1, int(hf.config.vocab_size), (2, 12),
                            generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            got, _ = megatron_logprobs(model.eval(), ids, mask)
            ref, _ = sequence_logprobs(hf.eval(), ids, mask)
    finally:
        destroy_parallel()
    assert (got - ref).abs().max() < 1e-2  # measured 1.5e-3 (GLM), 1.3e-3 (DeepSeek)

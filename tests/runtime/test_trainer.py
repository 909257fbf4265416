"""The embedded trainer's RL step: log-probs, exact micro-batching, replay, KL, schedule."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import transformers

from runtime.router_replay import RoutingTrace, patch_qwen3_moe
from runtime.sync_check import WeightSyncError
from runtime.trainer import TrainBatch, Trainer, kl_penalty, learning_rate, sequence_logprobs

ALGO = {
    "loss": "espo", "espo": {"alpha": 0.02, "high_entropy_fraction": 0.2},
    "grpo": {"clip_low": 0.2, "clip_high": 0.28}, "correction": {"mode": "tis", "cap": 2.0},
    "kl": {"coefficient": 0.0, "estimator": "k3"},
}
OPT = {"lr": 1e-2, "min_lr": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_eps": 1e-8,
       "weight_decay": 0.0, "clip_grad": 1e9, "warmup_steps": 0}


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.Qwen3MoeForCausalLM(cfg).float()


def make_batch(model, b: int = 8, t: int = 12, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 32, (b, t), generator=g)
    lengths = torch.randint(6, t + 1, (b,), generator=g)
    attn = torch.arange(t)[None] < lengths[:, None]
    ids = torch.where(attn, ids, torch.zeros_like(ids))
    loss_mask = attn & (torch.arange(t)[None] >= 4)  # 4 prompt tokens
    with torch.no_grad():
        logp, _ = sequence_logprobs(model, ids, attn)
    rollout = (logp + 0.05 * torch.randn(b, t, generator=g)) * loss_mask
    adv = torch.randn(b, generator=g)
    return TrainBatch(ids, attn, loss_mask, rollout, adv)


def test_sequence_logprobs_match_a_loop() -> None:
    model = tiny_model()
    batch = make_batch(model)
    logp, ent = sequence_logprobs(model, batch.input_ids, batch.attention_mask, with_entropy=True)
    with torch.no_grad():
        for b in range(batch.size):
            n = int(batch.attention_mask[b].sum())
            logits = model(input_ids=batch.input_ids[b : b + 1, :n]).logits[0]
            for t in range(1, n):
                dist = torch.log_softmax(logits[t - 1], -1)
                assert logp[b, t].item() == pytest.approx(dist[batch.input_ids[b, t]].item(), abs=1e-5)
                assert ent[b, t].item() == pytest.approx(-(dist.exp() * dist).sum().item(), abs=1e-5)
    assert torch.all(logp[:, 0] == 0)


def _grads(loss: str, micro: int) -> dict[str, torch.Tensor]:
    model = tiny_model()
    batch = make_batch(model)
    trainer = Trainer(model, algorithm={**ALGO, "loss": loss},
                      train={"micro_batch_size": micro, "global_batch_size": 8, "optimizer": OPT},
                      vocab_size=32)
    captured: dict[str, torch.Tensor] = {}

    def capture(*args, **kwargs):
        for name, p in model.named_parameters():
            if p.grad is not None:
                captured[name] = p.grad.clone()

    trainer.optimizer.step = capture  # type: ignore[method-assign]
    trainer.step(batch)
    return captured


@pytest.mark.parametrize("loss", ["espo", "grpo", "gspo", "cispo"])
def test_gradient_does_not_depend_on_micro_batch_size(loss: str) -> None:
    whole, split = _grads(loss, 8), _grads(loss, 3)
    assert whole.keys() == split.keys() and whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=2e-6, rtol=1e-4, msg=name)


def _metrics(loss: str, micro: int) -> dict[str, float]:
    model = tiny_model()
    trainer = Trainer(model, algorithm={**ALGO, "loss": loss},
                      train={"micro_batch_size": micro, "global_batch_size": 4, "optimizer": OPT},
                      vocab_size=32)
    return trainer.step(make_batch(model), epochs=2)


@pytest.mark.parametrize("loss", ["espo", "grpo"])
def test_step_metrics_do_not_depend_on_micro_batch_size(loss: str) -> None:
    """Counts are per optimizer step (4 responses of the 8, two epochs: 4 optimizer steps),
    extremes are the step's, token means do not move (GRPO's loss is a token mean; ESPO's is
    a sequence mean, whose token metrics are weighted by responses); the clusters run
    micro-batches of 1, the tests 2."""
    batch = make_batch(tiny_model())
    got = {micro: _metrics(loss, micro) for micro in (1, 2, 4)}
    assert got[1]["n_responses"] == 4.0 and got[1]["optimizer_steps"] == 4.0
    assert got[1]["n_tokens"] == float(batch.loss_mask.sum()) / 2
    keys = ["n_tokens", "n_responses", "ratio/min", "ratio/max"]
    keys += ["n_tokens/high", "n_tokens/low"] if loss == "espo" else ["ratio/mean", "approx_kl"]
    for key in keys:
        for micro in (2, 4):
            assert got[micro][key] == pytest.approx(got[1][key], rel=1e-5, abs=1e-6), (key, micro)
    assert got[1]["ratio/min"] < got[1]["ratio/mean"] < got[1]["ratio/max"]


def test_r3_replays_engine_routing_and_router_still_learns(monkeypatch) -> None:
    engine = tiny_model(seed=1)  # sampled with other weights: its routing differs
    model = tiny_model(seed=0)
    engine_replay, replay = patch_qwen3_moe(engine), patch_qwen3_moe(model)
    batch = make_batch(model)
    with torch.no_grad(), engine_replay.recording() as rec:
        engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long())
    ids = rec.trace.ids.reshape(batch.size, batch.input_ids.shape[1], *rec.trace.ids.shape[1:])
    trace = RoutingTrace(ids, 8)
    batch = TrainBatch(batch.input_ids, batch.attention_mask, batch.loss_mask,
                       batch.rollout_logp, batch.advantages, trace)
    # The trainer's forward under replay selects exactly the engine's experts.
    import runtime.router_replay as rr

    chosen: list[torch.Tensor] = []
    real = rr.select_experts

    def spy(*args, **kwargs):
        gates, ids = real(*args, **kwargs)
        chosen.append(ids)
        return gates, ids

    monkeypatch.setattr(rr, "select_experts", spy)
    with torch.no_grad(), replay.replaying(trace):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long())
    monkeypatch.undo()
    flat = trace.ids.reshape(-1, *trace.ids.shape[2:]).long()
    assert len(chosen) == 2
    for layer, ids in enumerate(chosen):
        assert torch.equal(ids.long(), flat[:, layer])
    with torch.no_grad(), replay.recording() as own:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long())
    assert not torch.equal(own.trace.ids.long(), flat), "engine and trainer should route apart"

    trainer = Trainer(model, algorithm=ALGO, train={"micro_batch_size": 4, "global_batch_size": 8,
                      "optimizer": OPT}, vocab_size=32, replay_mode="r3", replay=replay)
    router = next(p for n, p in model.named_parameters() if "gate" in n and p.dim() == 2)
    before = router.detach().clone()
    metrics = trainer.step(batch)
    assert not torch.equal(before, router.detach()), "the router received no update"
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["train_inference_gap"] > 0


def test_r2_and_updates_raise_the_likelihood_of_advantaged_responses() -> None:
    model = tiny_model()
    replay = patch_qwen3_moe(model)
    batch = make_batch(model)
    adv = torch.tensor([1.0, -1.0] * 4)
    batch = TrainBatch(batch.input_ids, batch.attention_mask, batch.loss_mask,
                       batch.rollout_logp, adv)
    trainer = Trainer(model, algorithm={**ALGO, "loss": "grpo"}, train={
        "micro_batch_size": 4, "global_batch_size": 8, "optimizer": OPT}, vocab_size=32,
        replay_mode="r2", replay=replay)

    def seq_logp() -> torch.Tensor:
        with torch.no_grad():
            logp, _ = sequence_logprobs(model, batch.input_ids, batch.attention_mask)
        return (logp * batch.loss_mask).sum(1)

    start = seq_logp()
    for step in range(5):
        trainer.step(batch, seed=step)
    delta = seq_logp() - start
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()


def test_kl_estimators_and_schedule() -> None:
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = ref - logp
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), -d)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * d * d)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.exp(d) - d - 1)
    assert torch.all(kl_penalty(logp, logp, "k3") == 0)
    assert learning_rate(0, total=10, lr=1.0, min_lr=0.0, warmup=2) == 0.5
    assert learning_rate(2, total=10, lr=1.0, min_lr=0.0, warmup=2) == 1.0
    assert learning_rate(10, total=10, lr=1.0, min_lr=0.1, warmup=2) == pytest.approx(0.1)


def test_kl_penalty_pulls_towards_the_reference() -> None:
    model = tiny_model()
    reference = copy.deepcopy(model).eval()
    batch = make_batch(model)
    batch = TrainBatch(batch.input_ids, batch.attention_mask, batch.loss_mask,
                       batch.rollout_logp, torch.zeros(8))  # no advantage: only KL acts
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = Trainer(model, algorithm={**ALGO, "kl": {"coefficient": 1.0, "estimator": "k3"}},
                      train={"micro_batch_size": 8, "global_batch_size": 8,
                             "optimizer": {**OPT, "lr": 1e-3}},
                      vocab_size=32, reference=reference)
    first = trainer.step(batch)["kl"]
    for _ in range(5):
        last = trainer.step(batch)["kl"]
    assert last < first


@pytest.mark.parametrize(("responses", "steps"), [(12, 2), (11, 1), (4, 1), (20, 3), (8, 1)])
def test_every_response_is_trained_in_near_equal_optimizer_steps(responses: int, steps: int) -> None:
    """Adaptive group sizes make a step's batch any size: nothing is trimmed, and the
    responses are split into round(B / global_batch_size) optimizer steps (at least one)."""
    model = tiny_model()
    trainer = Trainer(model, algorithm=ALGO, train={"micro_batch_size": 4, "global_batch_size": 8,
                      "optimizer": OPT}, vocab_size=32)
    seen: list[int] = []
    step = trainer._optimizer_step

    def spy(batch, mini, *args):  # type: ignore[no-untyped-def]
        seen.extend(mini.tolist())
        return step(batch, mini, *args)

    trainer._optimizer_step = spy  # type: ignore[method-assign]
    metrics = trainer.step(make_batch(model, b=responses))
    assert metrics["optimizer_steps"] == steps
    assert sorted(seen) == list(range(responses))


def test_token_advantages_come_from_the_same_old_policy_pass() -> None:
    """RL-ZVP's token advantages are computed from the entropies of the step's own
    old-policy pass (no second pass): the callback sees exactly those entropies."""
    model = tiny_model()
    trainer = Trainer(model, algorithm=ALGO, train={"micro_batch_size": 4, "global_batch_size": 8,
                      "optimizer": OPT}, vocab_size=32)
    batch = make_batch(model)
    _, expected, _ = trainer._old_pass(batch)
    seen: list[torch.Tensor] = []

    def advantages(entropy: torch.Tensor) -> torch.Tensor:
        seen.append(entropy.clone())
        return torch.zeros_like(entropy)  # zero advantages: the policy gradient vanishes

    calls = 0
    old_pass = trainer._old_pass

    def counting(b):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return old_pass(b)

    trainer._old_pass = counting  # type: ignore[method-assign]
    metrics = trainer.step(batch, advantages_from_entropy=advantages)
    assert calls == 1 and len(seen) == 1
    torch.testing.assert_close(seen[0], expected)
    assert metrics["loss"] == pytest.approx(0.0, abs=1e-7)


def test_with_two_ppo_epochs_the_schedule_reaches_min_lr_at_the_last_optimizer_step() -> None:
    """The trainer process's schedule length (from the compiled RL job's config) is the number
    of optimizer steps the run takes: ppo_epochs is counted once."""
    import json
    from pathlib import Path

    from compiler.api import compile_spec
    from runtime.trainer import schedule_length

    steps = 3
    tiny = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "spec.yaml"
    config = json.loads(compile_spec(tiny, [
        "algorithm.ppo_epochs=2", "rollout.prompts_per_step=2", "rollout.n=4",
        "train.global_batch_size=4", "train.micro_batch_size=4", f"train.steps={steps}",
        "train.optimizer.warmup_steps=0",  # a pure cosine: the lr falls at every step
    ]).files["jobs/rl/config.json"])
    spec = config["spec"]
    total = schedule_length(spec, config["derived"])
    model = tiny_model()
    trainer = Trainer(model, algorithm=ALGO, train=spec["train"], vocab_size=32,
                      total_optimizer_steps=total)
    lrs: list[float] = []
    set_lr = trainer._lr
    trainer._lr = lambda: lrs.append(set_lr()) or lrs[-1]  # type: ignore[method-assign]
    rollouts = spec["rollout"]["prompts_per_step"] * spec["rollout"]["n"]
    for step in range(steps):
        trainer.step(make_batch(model, b=rollouts, seed=step), epochs=spec["algorithm"]["ppo_epochs"])
    opt = spec["train"]["optimizer"]
    assert len(lrs) == trainer.optimizer_steps == total == 12
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(opt["lr"])
    last_decrement = learning_rate(total - 1, total=total, lr=opt["lr"], min_lr=opt["min_lr"],
                                   warmup=0) - opt["min_lr"]
    assert lrs[-1] - opt["min_lr"] == pytest.approx(last_decrement)
    assert last_decrement < 0.02 * (opt["lr"] - opt["min_lr"])  # the cosine's last step
    assert learning_rate(total, total=total, lr=opt["lr"], min_lr=opt["min_lr"],
                         warmup=0) == pytest.approx(opt["min_lr"])


def test_adam_takes_the_spec_values_and_decays_matrices_only() -> None:
    opt = {**OPT, "weight_decay": 0.25, "adam_beta1": 0.5, "adam_beta2": 0.75,
           "adam_eps": 1e-3}
    model = tiny_model()
    trainer = Trainer(model, algorithm=ALGO, train={"micro_batch_size": 8,
                      "global_batch_size": 8, "optimizer": opt}, vocab_size=32)
    decay, no_decay = trainer.optimizer.param_groups
    for group in (decay, no_decay):
        assert group["betas"] == (0.5, 0.75) and group["eps"] == 1e-3
    assert decay["weight_decay"] == 0.25 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # One step of AdamW: p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps); with a zero gradient only the
    # decay moves a matrix, by exactly the factor (1 − lr·wd).
    p = decay["params"][0]
    before = p.detach().clone()
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    trainer.optimizer.step()
    torch.testing.assert_close(p.detach(), before * (1 - OPT["lr"] * 0.25))


def test_clip_grad_bounds_the_gradient_norm_of_each_update() -> None:
    """With clip_grad far below the gradient's norm, the update applies a gradient of norm
    exactly clip_grad (the reported grad_norm is the norm before clipping)."""
    def norms(clip: float) -> tuple[float, float]:
        model = tiny_model()
        trainer = Trainer(model, algorithm=ALGO, train={
            "micro_batch_size": 8, "global_batch_size": 8,
            "optimizer": {**OPT, "clip_grad": clip}}, vocab_size=32)
        applied: list[float] = []

        def capture(*args, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            applied.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))

        trainer.optimizer.step = capture  # type: ignore[method-assign]
        metrics = trainer.step(make_batch(model))
        return applied[0], metrics["grad_norm"]

    free, raw = norms(1e9)
    assert free == pytest.approx(raw, rel=1e-5) and raw > 1e-3
    clipped, raw_again = norms(raw / 10)
    assert raw_again == pytest.approx(raw, rel=1e-5)
    assert clipped == pytest.approx(raw / 10, rel=1e-4)


@pytest.mark.parametrize("balancing", [True, False])
def test_length_balancing_groups_responses_of_similar_length(balancing: bool) -> None:
    model = tiny_model()
    trainer = Trainer(model, algorithm=ALGO, train={"micro_batch_size": 2,
                      "global_batch_size": 8, "optimizer": OPT}, vocab_size=32,
                      length_balancing=balancing)
    batch = make_batch(model)
    lengths = batch.attention_mask.sum(1)
    groups = [g.tolist() for g in trainer._micro_batches(torch.arange(batch.size), batch)]
    assert sorted(i for g in groups for i in g) == list(range(batch.size))
    if balancing:  # micro-batch after micro-batch, non-decreasing lengths
        order = [i for g in groups for i in g]
        assert lengths[order].tolist() == sorted(lengths.tolist())
    else:  # the rows in their own order
        assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert lengths.tolist() != sorted(lengths.tolist())  # so balancing would reorder them


@pytest.mark.parametrize("keep", [1, 2])
def test_the_embedded_trainer_keeps_the_newest_checkpoints(keep: int, tmp_path) -> None:
    """TrainerProcess.save_checkpoint prunes checkpoints/rl/step-* to train.checkpoint.keep."""
    import logging

    from runtime.exchange import RunPaths
    from runtime.jobs.train import TrainerProcess

    proc = TrainerProcess.__new__(TrainerProcess)  # the pruning needs no bundle or process
    proc.paths, proc.keep, proc.log = RunPaths(tmp_path), keep, logging.getLogger("test")
    proc.model = tiny_model()
    proc.trainer = Trainer(proc.model, algorithm=ALGO, train={
        "micro_batch_size": 8, "global_batch_size": 8, "optimizer": OPT}, vocab_size=32)
    for step in range(1, 5):
        proc.save_checkpoint(step)
    kept = sorted(p.name for p in proc.paths.checkpoints.iterdir())
    assert kept == [f"step-{s}" for s in range(5 - keep, 5)]


def test_the_trainer_reads_a_trained_batch_file_once(tmp_path, monkeypatch) -> None:
    """A trained batch stays in the exchange folder until the driver has loaded its weights
    (GBs with R3's routing): the trainer's 50 ms poll reads it once, not at every poll, and
    again once it is replaced (a restarted driver's) or its done file is gone."""
    import json

    from runtime.exchange import RunPaths, write_batch
    from runtime.jobs.train import TrainerProcess

    proc = TrainerProcess.__new__(TrainerProcess)  # the poll needs no bundle or process
    proc.paths, proc._trained = RunPaths(tmp_path), {}
    proc.paths.exchange.mkdir(parents=True)
    loads: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda p, **kw: (loads.append(p.name), real_load(p, **kw))[1])
    write_batch(proc.paths.batch(0), {"step": 0, "batch_id": "a"})
    assert proc.next_batch() == {"step": 0, "batch_id": "a"}
    proc.paths.done(0).write_text(json.dumps({"batch_id": "a"}))
    assert [proc.next_batch() for _ in range(3)] == [None] * 3
    assert loads == ["batch-0.pt"] * 2  # found, then found trained: no more
    write_batch(proc.paths.batch(1), {"step": 1, "batch_id": "b"})
    assert proc.next_batch() == {"step": 1, "batch_id": "b"} and loads[-1] == "batch-1.pt"
    proc.paths.batch(1).unlink()
    write_batch(proc.paths.batch(0), {"step": 0, "batch_id": "c"})  # a restarted driver's
    assert proc.next_batch() == {"step": 0, "batch_id": "c"}
    proc.paths.done(0).write_text(json.dumps({"batch_id": "c"}))
    assert proc.next_batch() is None
    proc.paths.done(0).unlink()
    assert proc.next_batch() == {"step": 0, "batch_id": "c"}


def test_a_step_stops_before_updating_when_the_engine_serves_other_weights() -> None:
    """system.weight_sync_tolerance: the engine's log-probs (noise 0.05 per token here, a
    mean gap of about 0.04) pass a tolerance of 0.1 and stop a step at 0.01, with no update."""
    model = tiny_model()
    batch = make_batch(model)
    train = {"micro_batch_size": 4, "global_batch_size": 8, "optimizer": OPT}
    passing = Trainer(model, algorithm=ALGO, train=train, vocab_size=32, sync_tolerance=0.1)
    metrics = passing.step(batch, version=3)
    assert 0.01 < metrics["train_inference_gap"] < 0.1
    before = copy.deepcopy(model.state_dict())
    strict = Trainer(model, algorithm=ALGO, train=train, vocab_size=32, sync_tolerance=0.01)
    with pytest.raises(WeightSyncError, match=r"by 0\.0\d+ on average over \d+ response tokens "
                                              r"of step 4 .*do not serve the weights of version 4"):
        strict.step(make_batch(model), version=4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was updated


def test_a_stale_batch_is_trained_with_its_gap_logged_not_checked() -> None:
    """system.max_staleness: a batch sampled by weights older than the trainer's
    (``behaviour_version`` < ``version``) differs from the trainer's log-probs by design, so
    the weight-sync check passes it to the correction and logs the gap; the same batch
    sampled by the trainer's own version is stopped."""
    model = tiny_model()
    train = {"micro_batch_size": 4, "global_batch_size": 8, "optimizer": OPT}
    strict = Trainer(model, algorithm=ALGO, train=train, vocab_size=32, sync_tolerance=0.01)
    before = copy.deepcopy(model.state_dict())
    metrics = strict.step(make_batch(model), version=4, behaviour_version=3)
    assert metrics["train_inference_gap"] > 0.01
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(WeightSyncError):
        strict.step(make_batch(model), version=5, behaviour_version=5)


def test_a_tied_policy_trains_its_one_embedding_tensor(tmp_path) -> None:
    """``tie_embeddings: true`` builds a policy whose output layer is its input embedding;
    one RL step on the embedded trainer updates that one tensor with the gradient of both
    uses (the untied twin, same start, moves its two copies apart), and the published
    checkpoint loads tied again."""
    from pathlib import Path

    import yaml

    from runtime.policy import build_policy, build_tokenizer, load_policy, save_policy

    arch = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "tiny" /
                           "spec.yaml").read_text())["model"]["architecture"]
    tok = build_tokenizer(int(arch["vocab_size"]))
    tied = build_policy({**arch, "tie_embeddings": True}, tok, seed=0)
    emb = tied.model.embed_tokens.weight
    assert tied.lm_head.weight is emb
    untied = build_policy(arch, tok, seed=0)
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():  # the same start: lm_head a copy of the shared tensor
        untied.lm_head.weight.copy_(emb)
    start = emb.detach().clone()

    vocab = int(arch["vocab_size"])
    batch = make_batch(tied)  # token ids < 32 ≤ vocab
    train = {"micro_batch_size": 4, "global_batch_size": 8, "optimizer": OPT}
    trainer = Trainer(tied, algorithm=ALGO, train=train, vocab_size=vocab)
    assert sum(p is emb for g in trainer.optimizer.param_groups for p in g["params"]) == 1
    trainer.step(batch)
    Trainer(untied, algorithm=ALGO, train=train, vocab_size=vocab).step(batch)

    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # still one tensor
    assert not torch.equal(emb, start)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    assert not torch.allclose(emb, untied.model.embed_tokens.weight, atol=1e-6)
    assert not torch.allclose(emb, untied.lm_head.weight, atol=1e-6)

    loaded, _ = load_policy(save_policy(tied, tok, tmp_path / "v1"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, emb)


@pytest.mark.parametrize("loss", ["grpo", "espo"])
def test_reshaped_rows_report_their_share_of_the_gradient_norm(loss: str) -> None:
    """‖g_R‖ / ‖g‖ of RL-ZVP's rows equals the ratio of two reference steps' gradient norms:
    the step with only those rows' advantages (the others at A = 0 add no gradient but keep
    the mini-batch's normalisation) over the full step; splitting the accumulation by class
    leaves the full gradient as it was."""
    reshaped = torch.tensor([True, False, True, True, False, False, True, False])

    def run(batch_edit, rows):
        model = tiny_model()
        trainer = Trainer(model, algorithm={**ALGO, "loss": loss},
                          train={"micro_batch_size": 3, "global_batch_size": 8, "optimizer": OPT},
                          vocab_size=32)
        captured: dict[str, torch.Tensor] = {}

        def capture(*args, **kwargs):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None})

        trainer.optimizer.step = capture  # type: ignore[method-assign]
        batch = batch_edit(make_batch(model))
        return trainer.step(batch, reshaped_rows=rows), captured

    full, grads = run(lambda b: b, reshaped)
    plain, plain_grads = run(lambda b: b, None)
    only_r, _ = run(lambda b: replace(b, advantages=b.advantages * reshaped), None)
    assert full["reshaped_grad_norm_share"] == pytest.approx(
        only_r["grad_norm"] / plain["grad_norm"], rel=1e-4)
    assert full["reshaped_grad_norm_share"] > 0 and "reshaped_grad_norm_share" not in plain
    for name in plain_grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=2e-6, rtol=1e-4, msg=name)
    none, _ = run(lambda b: b, torch.zeros(8, dtype=torch.bool))
    assert none["reshaped_grad_norm_share"] == 0.0

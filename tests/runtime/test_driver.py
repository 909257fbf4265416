"""The RL driver's step in this process, with stand-ins only at its edges: a scripted rollout
client (the completions it returns are chosen per prompt) or two real embedded engine
replicas (``runtime.rollout.server``) and, where the trainer's side is checked, the real
trainer process (``runtime.jobs.train.TrainerProcess``) on the tiny policy. What is checked
is what the spec's system and advantage settings change in the step: how rewards are scored
against generation, which replica generates which group, and the advantages the trainer
trains on; and that the prompts' length history survives a resume.
"""

from __future__ import annotations

import json
import statistics
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from compiler.api import compile_spec
from runtime.jobs.common import JobContext
from tests.helpers import rollout_servers

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny" / "spec.yaml"


class ScriptedClient:
    """Rollout engine stand-in: prompt text → the texts of its n completions (cycled). Each
    ``generate`` call is recorded as (prompt texts, n) in ``calls`` and its sampling
    parameters in ``sampling``; ``before_return`` (if set) runs before a call returns, with
    the call's prompt texts."""

    endpoints: ClassVar[list[str]] = ["stand-in"]

    def __init__(self, tokenizer: Any, answers: dict[str, list[str]]) -> None:
        self.tokenizer = tokenizer
        self.answers = answers
        self.calls: list[tuple[list[str], int]] = []
        self.sampling: list[dict[str, Any]] = []
        self.before_return: Any = None
        self.lock = threading.Lock()

    def generate(self, prompts: list[list[int]], *, n: int, sampling: dict[str, Any],
                 return_routed_experts: bool = False, endpoint: int | None = None,
                 on_request: Any = None) -> list[list[Any]]:
        from runtime.rollout.client import Completion

        texts = [self.tokenizer.decode(p) for p in prompts]
        with self.lock:
            self.calls.append((texts, n))
            self.sampling.append(dict(sampling))
        out = []
        for p, text in zip(prompts, texts, strict=True):
            script = self.answers[text]
            group = []
            for k in range(n):
                ids = [*self.tokenizer.encode(script[k % len(script)], add_special_tokens=False),
                       self.tokenizer.eos_token_id]
                group.append(Completion(list(p), ids, np.full(len(ids), -0.5, dtype=np.float32),
                                        None, "stop", None))
            out.append(group)
        if self.before_return is not None:
            self.before_return(texts)
        return out


def _context(tmp_path: Path, prompts: int, *edits: str) -> JobContext:
    """The RL job's context of the tiny spec on a train file of ``prompts`` rows i+1=."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": i, "prompt": f"{i}+1=", "answer": str(i + 1)})
                             + "\n" for i in range(prompts)))
    compiled = compile_spec(TINY, [
        "data.generator=null", f"data.train={train}", f"data.eval={train}",
        f"rollout.prompts_per_step={prompts}", "rollout.n=4",
        f"train.global_batch_size={4 * prompts}", "train.micro_batch_size=4", *edits])
    config = tmp_path / "b" / "jobs" / "rl" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(compiled.files["jobs/rl/config.json"])
    return JobContext.load(config, run_dir=tmp_path / "run", log_to_file=False)


# --------------------------------------------------------------------------- reward overlap


class RecordingReward:
    """The spec's reward, with every group it scores recorded in ``events``."""

    def __init__(self, inner: Any, events: list[tuple[str, Any]], lock: threading.Lock) -> None:
        self.inner, self.events, self.lock = inner, events, lock
        self.scored = threading.Event()

    def group_rewards(self, prompt: str, texts: list[str], reference: str) -> Any:
        with self.lock:
            self.events.append(("score", prompt))
        self.scored.set()
        return self.inner.group_rewards(prompt, texts, reference)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("overlap", [True, False])
def test_reward_overlap_scores_chunks_while_others_still_generate(tmp_path: Path,
                                                                   overlap: bool) -> None:
    """``system.reward_overlap: true``: the step's prompts are generated in chunks (two per
    endpoint) and a chunk is scored as soon as it returns, while another chunk is still
    generating (the chunk without the first prompt returns only once a score has happened);
    ``false``: one request of every prompt, scored after it returns."""
    from runtime.driver import RLDriver
    from runtime.policy import build_tokenizer
    from runtime.rewards import build_reward

    ctx = _context(tmp_path, 4, "filters=[]", "algorithm.advantage.estimator=group",
                   f"system.reward_overlap={str(overlap).lower()}")
    tokenizer = build_tokenizer(64)
    client = ScriptedClient(tokenizer, {f"{i}+1=": [str(i + 1), "0"] for i in range(4)})
    driver = RLDriver(ctx, client=client)
    events: list[tuple[str, Any]] = []
    reward = RecordingReward(build_reward(ctx.spec["reward"]), events, client.lock)
    first = driver.rows[next(iter(driver.rows))]["prompt"]

    def before_return(texts: list[str]) -> None:
        if first not in texts:  # this chunk waits until another chunk has been scored
            assert reward.scored.wait(timeout=60), "no chunk was scored while this one generated"
        with client.lock:
            events.append(("returned", tuple(texts)))

    client.before_return = before_return
    batch, _ = driver._rollouts(driver._new_state(), 0, tokenizer, reward,
                                {"tokens": 0, "seconds": 0.0})
    assert len(batch.groups) == 4
    kinds = [kind for kind, _ in events]
    if overlap:
        assert len(client.calls) == 2 and all(len(texts) == 2 for texts, _ in client.calls)
        # a score between the two returns: the second chunk was still generating
        assert kinds.index("score") < len(kinds) - 1 - kinds[::-1].index("returned")
    else:
        assert len(client.calls) == 1 and len(client.calls[0][0]) == 4
        assert kinds == ["returned"] + ["score"] * 4


# --------------------------------------------------------------------------- reward workers


def _policy_tokenizer(ctx: JobContext) -> Any:
    """The character tokenizer, saved as the RL job's HF policy input (what the reward
    workers load)."""
    from runtime.files import atomic_dir
    from runtime.policy import build_tokenizer, save_tokenizer

    tokenizer = build_tokenizer(64)
    name = next(n for n, ref in ctx.inputs.items() if ref.kind == "hf_checkpoint")
    with atomic_dir(ctx.input_path(name, check=False)) as tmp:
        save_tokenizer(tokenizer, tmp)
    return tokenizer


@pytest.mark.parametrize("overlap", [True, False])
def test_reward_workers_score_the_same_groups_as_the_drivers_thread(tmp_path: Path,
                                                                     overlap: bool) -> None:
    """``system.reward_workers: 2``: ``run()`` makes one pool of 2 worker processes for the
    run, the step's groups (and the in-run evaluation's) are decoded and scored there — the
    same rewards, scores, lengths, order and accuracy as the driver's own thread
    (``reward_workers: 1``, no pool) — and the pool is shut down (its workers gone) when
    ``run()`` returns."""
    from runtime.driver import RLDriver
    from runtime.processes import pid_alive
    from runtime.rewards import build_reward
    from runtime.scoring import ScoringPool

    # right first for odd i, wrong first for even i: the evaluation (1 sample) gets half
    answers = {f"{i}+1=": [str(i + 1), "0", f"{i + 1} ok", str(i)][::1 if i % 2 else -1]
               for i in range(4)}

    def step(workers: int) -> tuple[list[Any], Any]:
        (tmp_path / str(workers)).mkdir()
        ctx = _context(tmp_path / str(workers), 4, "filters=[]",
                       "algorithm.advantage.estimator=group",
                       f"system.reward_overlap={str(overlap).lower()}",
                       f"system.reward_workers={workers}")
        tokenizer = _policy_tokenizer(ctx)
        driver = RLDriver(ctx, client=ScriptedClient(tokenizer, answers))
        seen: dict[str, Any] = {}

        def run_steps() -> dict[str, Any]:  # the run's steps: here, one step's rollouts
            seen["pool"], seen["submitted"] = driver.scorer, 0
            if driver.scorer is not None:
                driver.scorer.wait_ready(timeout=300)
                submit = driver.scorer.submit

                def counted(*args: Any) -> Any:
                    seen["submitted"] += 1
                    return submit(*args)

                driver.scorer.submit = counted  # type: ignore[method-assign]
            state, reward = driver._new_state(), build_reward(ctx.spec["reward"])
            seen["batch"], _ = driver._rollouts(state, 0, tokenizer, reward,
                                                {"tokens": 0, "seconds": 0.0})
            seen["eval"] = driver._evaluate(tokenizer, reward, state.pipeline.ctx)
            return {}

        driver._run = run_steps  # type: ignore[method-assign]
        driver.run()
        assert driver.scorer is None
        # each group of the step and of the evaluation went to a worker
        assert seen["submitted"] == (8 if workers > 1 else 0)
        return seen["batch"].groups + seen["batch"].removed, seen["pool"], seen["eval"]

    one, no_pool, eval_one = step(1)
    two, pool, eval_two = step(2)
    assert eval_one == eval_two == 0.5
    assert no_pool is None and isinstance(pool, ScoringPool) and pool.workers == 2
    assert len(one) == 4
    assert any(r == 1.0 for g in one for r in g.raw_rewards)
    assert any(r == 0.0 for g in one for r in g.raw_rewards)
    for a, b in zip(one, two, strict=True):
        assert a.prompt_id == b.prompt_id
        assert list(a.raw_rewards) == list(b.raw_rewards)
        assert list(a.scores) == list(b.scores) and list(a.lengths) == list(b.lengths)
        assert a.token_ids == b.token_ids
    # every worker process has ended: the pool was shut down with the run
    pids = set(pool.pids)
    assert len(pids) == 2 and not any(pid_alive(pid) for pid in pids)


# --------------------------------------------------------------------------- seeded sampling


def _seeded_context(path: Path, *edits: str) -> JobContext:
    path.mkdir()
    return _context(path, 8, "filters=[]", "algorithm.advantage.estimator=group",
                    "system.reward_overlap=true", "rollout.prompts_per_step=4",
                    "train.global_batch_size=16", *edits)


def _seeded_requests(ctx: JobContext, steps: int, state: Any = None) -> tuple[list[Any], Any]:
    """(prompt texts, n, seed) of every generate call of ``steps`` driver steps from
    ``state`` (a fresh one by default), and the state after them."""
    from runtime.driver import RLDriver
    from runtime.policy import build_tokenizer
    from runtime.rewards import build_reward

    tokenizer = build_tokenizer(64)
    client = ScriptedClient(tokenizer, {f"{i}+1=": [str(i + 1), "0"] for i in range(8)})
    driver = RLDriver(ctx, client=client)
    state = state if state is not None else driver._new_state()
    reward = build_reward(ctx.spec["reward"])
    for _ in range(steps):
        driver._rollouts(state, state.step, tokenizer, reward, {"tokens": 0, "seconds": 0.0})
        state.step += 1
    return [(texts, n, s["seed"]) for (texts, n), s in zip(client.calls, client.sampling,
                                                           strict=True)], state


def test_every_rollout_request_is_seeded_from_the_run_seed_step_and_prompts(
        tmp_path: Path) -> None:
    """Each generate call of a step carries a seed: the same spec gives the same prompts and
    seeds step by step; a driver resumed from the pickled state after step 1 sends step 2's
    requests exactly as the uninterrupted driver did; every request of a run has its own
    seed; another ``train.seed`` gives other seeds for the same prompts."""
    from runtime.driver_state import load_state, save_state

    a, _ = _seeded_requests(_seeded_context(tmp_path / "a"), 3)
    b, _ = _seeded_requests(_seeded_context(tmp_path / "b"), 3)
    assert a == b
    seeds = [seed for _, _, seed in a]
    assert all(isinstance(s, int) and 0 <= s < 2**62 for s in seeds)
    assert len(set(seeds)) == len(seeds) == 6  # 2 chunks a step (reward overlap), 3 steps

    ctx = _seeded_context(tmp_path / "c")
    first, state = _seeded_requests(ctx, 2)
    save_state(tmp_path / "driver.pkl", state)
    resumed, _ = _seeded_requests(ctx, 1, load_state(tmp_path / "driver.pkl"))
    assert first + resumed == a

    other, _ = _seeded_requests(_seeded_context(tmp_path / "d", "train.seed=7"), 3)
    assert [(t, n) for t, n, _ in other] == [(t, n) for t, n, _ in a]  # same prompts
    assert not {s for _, _, s in other} & set(seeds)


# --------------------------------------------------------------------------- length balancing


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two embedded rollout servers of the tiny spec's policy (random init)."""
    from runtime.policy import build_policy, build_tokenizer, save_policy

    root = tmp_path_factory.mktemp("replicas")
    config = json.loads(compile_spec(TINY, []).files["jobs/rl/config.json"])
    arch = config["spec"]["model"]["architecture"]
    tokenizer = build_tokenizer(int(arch["vocab_size"]))
    save_policy(build_policy(arch, tokenizer, seed=0), tokenizer, root / "policy")
    with rollout_servers(root / "policy", root, 2, "--return-routed-experts") as urls:
        yield urls


@pytest.mark.parametrize("balancing", [True, False])
def test_length_balancing_spreads_groups_over_replicas_by_predicted_length(
        tmp_path: Path, replicas: list[str], balancing: bool) -> None:
    """Two embedded engine replicas, 4 prompts × 4 samples; the history predicts prompt 0 50×
    longer than the others. ``system.length_balancing: true``: longest first to the least
    loaded replica, so prompt 0 has a replica to itself and the other three share the other;
    ``false``: the client's round-robin, two prompts each. Either way each group's lengths
    become its prompt's prediction, and each replica's busy time (within the generation's
    wall time) and idle fraction are measured for the metrics line."""
    from runtime.driver import RLDriver
    from runtime.policy import build_tokenizer
    from runtime.rewards import build_reward
    from runtime.rollout.client import RolloutClient
    from runtime.run_log import replica_metrics

    ctx = _context(tmp_path, 4, "filters=[]", "algorithm.advantage.estimator=group",
                   "system.reward_overlap=false",
                   f"system.length_balancing={str(balancing).lower()}")
    tokenizer = build_tokenizer(int(ctx.spec["model"]["architecture"]["vocab_size"]))
    with RolloutClient(replicas, timeout_s=120, retries=0) as client:
        driver = RLDriver(ctx, client=client)
        state = driver._new_state()
        long_id = next(iter(driver.rows))
        for pid in driver.rows:
            state.lengths.observe(pid, [200] * 4 if pid == long_id else [4] * 4)
        stats: dict[str, Any] = {"tokens": 0, "seconds": 0.0}
        batch, _ = driver._rollouts(state, 0, tokenizer, build_reward(ctx.spec["reward"]), stats)
    groups = batch.groups + batch.removed
    served = {g.prompt_id: {c.endpoint for c in g.payload[1]} for g in groups}
    assert sorted(served) == sorted(driver.rows)
    assert all(len(urls) == 1 for urls in served.values())  # a group stays on one replica
    per_replica = Counter(next(iter(urls)) for urls in served.values())
    if balancing:
        assert per_replica[next(iter(served[long_id]))] == 1
        assert sorted(per_replica.values()) == [1, 3]
    else:
        assert sorted(per_replica.values()) == [2, 2]
    for g in groups:  # the step's lengths replace the history
        assert state.lengths.predict(g.prompt_id) == statistics.mean(g.lengths)
    line = replica_metrics(stats)
    assert line["generation_seconds"] == stats["seconds"]
    busy, idle = line["replica_busy_seconds"], line["replica_idle_fraction"]
    assert len(busy) == len(idle) == 2
    assert all(0 < b <= line["generation_seconds"] for b in busy)
    assert idle == [pytest.approx(1 - b / line["generation_seconds"]) for b in busy]


def test_the_weight_sync_probe_stops_a_run_whose_engines_do_not_serve_the_trainers_weights(
        tmp_path: Path, replicas: list[str]) -> None:
    """After loading version v the driver compares each engine's log-probs of v's probe (in
    the version folder's completion marker) with the trainer's: the engines' own weights pass
    (gap at float noise); a probe of other weights (an update that did not take effect) stops
    the run with the tolerance in the message; a version without a probe is not checked."""
    from runtime.driver import RLDriver
    from runtime.errors import JobError
    from runtime.policy import build_policy, build_tokenizer, save_policy
    from runtime.rollout.client import RolloutClient
    from runtime.sync_check import probe_sequence
    from runtime.trainer import sequence_logprobs

    ctx = _context(tmp_path, 4, "system.weight_sync_tolerance=0.001")
    arch = ctx.spec["model"]["architecture"]
    tokenizer = build_tokenizer(int(arch["vocab_size"]))
    ids = torch.tensor([tokenizer.encode("12+30=42", add_special_tokens=False)])
    tokens = probe_sequence(ids, torch.ones_like(ids))
    with RolloutClient(replicas, timeout_s=120, retries=0) as client:
        driver = RLDriver(ctx, client=client)
        for version, seed in ((1, 0), (2, 1)):  # the replicas serve seed 0's weights
            policy = build_policy(arch, tokenizer, seed=seed)
            with torch.no_grad():
                logp, _ = sequence_logprobs(policy, torch.tensor([tokens]),
                                            torch.ones(1, len(tokens), dtype=torch.long))
            save_policy(policy, tokenizer, driver.paths.version(version), step=version,
                        probe={"token_ids": tokens, "logprobs": logp[0, 1:].tolist()})
        assert driver._check_probe(1) < 1e-5
        with pytest.raises(JobError, match=r"over \d+ probe tokens of weights v2 on http://"
                                           r"127\.0\.0\.1:\d+ \(system\.weight_sync_"
                                           r"tolerance 0\.001\).*do not serve the weights of "
                                           r"version 2"):
            driver._check_probe(2)
        save_policy(build_policy(arch, tokenizer, seed=0), tokenizer, driver.paths.version(3))
        assert driver._check_probe(3) is None
        nan = {"token_ids": tokens, "logprobs": [float("nan")] * (len(tokens) - 1)}
        save_policy(build_policy(arch, tokenizer, seed=0), tokenizer, driver.paths.version(4),
                    probe=nan)  # a NaN gap fails, whichever engine it comes from
        with pytest.raises(JobError, match="differ from the trainer's by nan"):
            driver._check_probe(4)


def test_the_driver_waits_for_its_engines_as_long_as_the_spec_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """system.startup_timeout_s bounds the wait for the engines (and the trainer's first
    heartbeat); RLSPEC_STARTUP_TIMEOUT, where set, wins."""
    import socket

    from runtime.driver import RLDriver
    from runtime.rollout.client import RolloutClient, RolloutError

    monkeypatch.delenv("RLSPEC_STARTUP_TIMEOUT", raising=False)
    from runtime.policy import build_policy, build_tokenizer, save_policy

    ctx = _context(tmp_path, 4, "system.startup_timeout_s=0.5")
    tokenizer = build_tokenizer(int(ctx.spec["model"]["architecture"]["vocab_size"]))
    name = next(n for n, ref in ctx.inputs.items() if ref.kind == "hf_checkpoint")
    save_policy(build_policy(ctx.spec["model"]["architecture"], tokenizer, seed=0), tokenizer,
                ctx.input_path(name, check=False))  # what the driver reads before it waits
    with socket.socket() as s:  # a port nothing listens on: the engines never come up
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with RolloutClient([f"http://127.0.0.1:{port}"], timeout_s=5, retries=0) as client:
        driver = RLDriver(ctx, client=client)
        assert driver.startup_timeout_s == 0.5
        with pytest.raises(RolloutError, match=r"not ready after 0\.5 s"):
            driver.run()
    monkeypatch.setenv("RLSPEC_STARTUP_TIMEOUT", "7")
    assert RLDriver(ctx, client=None).startup_timeout_s == 7.0


def test_the_length_history_survives_a_resume(tmp_path: Path) -> None:
    """A step's group lengths become the predictions (answers of 1 and 5 characters + EOS);
    the state pickled after the step resumes with them; a state pickled before the predictor
    existed resumes with an empty one (the prior: rollout.max_tokens / 2)."""
    from runtime.driver import RLDriver
    from runtime.driver_state import save_state
    from runtime.policy import build_tokenizer
    from runtime.rewards import build_reward

    ctx = _context(tmp_path, 2, "filters=[]", "algorithm.advantage.estimator=group")
    tokenizer = build_tokenizer(64)
    client = ScriptedClient(tokenizer, {"0+1=": ["1"], "1+1=": ["22222"]})
    driver = RLDriver(ctx, client=client)
    state = driver._new_state()
    half = int(ctx.spec["rollout"]["max_tokens"]) / 2
    assert state.lengths.predict(0) == half
    driver._rollouts(state, 0, tokenizer, build_reward(ctx.spec["reward"]),
                     {"tokens": 0, "seconds": 0.0})
    assert (state.lengths.predict(0), state.lengths.predict(1), state.lengths.prior) == (2, 6, 4)
    state.step = 1
    save_state(driver.paths.state, state)
    resumed = RLDriver(ctx, client=client)._resume()
    assert resumed.step == 1
    assert (resumed.lengths.predict(0), resumed.lengths.predict(1), resumed.lengths.predict(7)) \
        == (2, 6, 4)
    del state.__dict__["lengths"]  # as pickled before length balancing
    save_state(driver.paths.state, state)
    assert RLDriver(ctx, client=client)._resume().lengths.predict(1) == half


# --------------------------------------------------------------------------- advantage estimator

ANSWERS = {"0+1=": ["1"], "1+1=": ["7"], "2+1=": ["3", "3", "9", "9"]}  # right, wrong, mixed


@pytest.mark.parametrize("estimator", ["rl_zvp", "group"])
def test_the_trainers_token_advantages_follow_the_estimator(tmp_path: Path,
                                                            estimator: str) -> None:
    """The driver's step → the trainer process's step, one flat_groups rl_zvp stage keeping
    flat groups in the batch. ``estimator: rl_zvp``: the trainer's token advantages of the
    all-correct group are +alpha_zvp·H_t, of the all-wrong group −alpha_zvp·(max H − H_t)
    (H the old policy's entropies of the step), of the mixed group its group advantage;
    ``group``: the flat groups train with advantage 0. (The compiler pairs the estimator with
    the flat_groups stage; here the estimator alone is varied in the job's config.)"""
    from runtime.advantages import group_advantages
    from runtime.driver import RLDriver
    from runtime.jobs.train import TrainerProcess
    from runtime.policy import build_policy, build_tokenizer, save_policy
    from runtime.rewards import build_reward

    # the scripted engine's log-probs are not the policy's: no weight-sync check here
    ctx = _context(tmp_path, 3, "filters=[{type: flat_groups, action: rl_zvp}]",
                   "algorithm.advantage.estimator=rl_zvp", "algorithm.advantage.alpha_zvp=0.25",
                   "system.weight_sync_tolerance=1000")
    ctx.spec["algorithm"]["advantage"]["estimator"] = estimator
    arch = ctx.spec["model"]["architecture"]
    tokenizer = build_tokenizer(int(arch["vocab_size"]))
    policy = next(name for name, ref in ctx.inputs.items() if ref.kind == "hf_checkpoint")
    save_policy(build_policy(arch, tokenizer, seed=0), tokenizer,
                ctx.input_path(policy, check=False))

    driver = RLDriver(ctx, client=ScriptedClient(tokenizer, ANSWERS))
    state = driver._new_state()
    batch, _ = driver._rollouts(state, 0, tokenizer, build_reward(ctx.spec["reward"]),
                                {"tokens": 0, "seconds": 0.0})
    assert sorted(g.status for g in batch.groups) == ["reshaped", "reshaped", "used"]
    payload = driver._batch(state, batch, driver._model_shape(), tokenizer.pad_token_id)
    payload.update(step=0, batch_id="b0", version=0, optimizer_steps=0, last=False)

    proc = TrainerProcess(ctx)
    seen: dict[str, torch.Tensor] = {}
    step = proc.trainer.step

    def spy(train_batch: Any, *, advantages_from_entropy: Any = None, **kw: Any) -> Any:
        def token_advantages(entropy: torch.Tensor) -> torch.Tensor:
            seen["entropy"] = entropy
            seen["advantages"] = advantages_from_entropy(entropy)
            return seen["advantages"]

        seen["batch_advantages"] = train_batch.advantages
        return step(train_batch, advantages_from_entropy=advantages_from_entropy and
                    token_advantages, **kw)

    proc.trainer.step = spy  # type: ignore[method-assign]
    metrics = proc.train_batch(payload)

    mask = payload["loss_mask"]
    texts = [tokenizer.decode(ids[:4]) for ids in payload["input_ids"]]
    rows = {p: [b for b, t in enumerate(texts) if t == p] for p in ANSWERS}
    assert sorted(len(r) for r in rows.values()) == [4, 4, 4]
    mixed = torch.tensor([1.0, 1.0, 0.0, 0.0])  # "3" right, "9" wrong
    group = group_advantages(mixed[None])[0]
    if estimator == "group":
        assert "advantages" not in seen  # the sequence advantages are trained on
        adv = seen["batch_advantages"]
        assert torch.equal(adv[rows["0+1="] + rows["1+1="]], torch.zeros(8))
        assert sorted(adv[rows["2+1="]].tolist()) == pytest.approx(sorted(group.tolist()))
        assert metrics["reshaped_advantage_share"] == 0.0  # flat groups carry no advantage
        return
    adv, entropy = seen["advantages"], seen["entropy"]
    for b in rows["0+1="]:
        m = mask[b]
        torch.testing.assert_close(adv[b][m], 0.25 * entropy[b][m])
        assert (adv[b][m] > 0).all()
    for b in rows["1+1="]:
        m = mask[b]
        torch.testing.assert_close(adv[b][m], -0.25 * (entropy[b][m].max() - entropy[b][m]))
        assert (adv[b][m] <= 0).all() and (adv[b][m] < 0).any()
    for b in rows["2+1="]:
        m = mask[b]
        want = group[0] if tokenizer.decode(payload["input_ids"][b][4:5]) == "3" else group[2]
        torch.testing.assert_close(adv[b][m], torch.full_like(adv[b][m], float(want)))
    assert (adv[~mask] == 0).all()
    # the reshaped groups' share of the step's Σ|A| over response tokens
    mass = (adv.abs() * mask).sum(1)
    reshaped = mass[rows["0+1="] + rows["1+1="]].sum() / mass.sum()
    assert 0 < metrics["reshaped_advantage_share"] < 1
    assert metrics["reshaped_advantage_share"] == pytest.approx(float(reshaped))
    assert metrics["reshaped_grad_norm_share"] > 0  # their part of the gradient's norm


def test_tensorboard_missing_is_tolerated_and_other_import_errors_propagate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import sys

    from runtime.run_log import _tensorboard

    log = logging.getLogger("test_tensorboard")
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed
    with caplog.at_level(logging.WARNING, logger="test_tensorboard"):
        assert _tensorboard(tmp_path, log) is None
    assert "no TensorBoard events" in caplog.text

    monkeypatch.delitem(sys.modules, "tensorboard")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not tensorboard's error
    with pytest.raises(ImportError):
        _tensorboard(tmp_path, log)

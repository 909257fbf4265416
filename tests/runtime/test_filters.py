"""Tests of runtime/filters: the multi-stage zero-variance elimination (DESIGN.md §4)."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.filters import (
    STAGES,
    AdaptiveGroupSize,
    FlatGroups,
    Group,
    History,
    Ledger,
    OfflinePassRate,
    Pipeline,
    PoolExhausted,
    PromptStream,
    Request,
    RewardShaping,
    ScreenResult,
    allocate_budget,
    build_pipeline,
    grown_group_size,
    is_flat,
    mixed_probability,
    repeated_ngram_fraction,
    rollouts_per_informative_group,
)
from runtime.filters.simulation import simulate

# --------------------------------------------------------------------------- helpers
# Prompt ids are strings whose first letter fixes the rewards of every sample:
# "m…" mixed (1, 0, 1, 0, …), "c…" all correct, "w…" all wrong, "h…" all 0.5.


def _rewards(pid: str, n: int) -> np.ndarray:
    kind = pid[0]
    if kind == "m":
        return (np.arange(n) % 2 == 0).astype(float)
    return np.full(n, {"c": 1.0, "w": 0.0, "h": 0.5}[kind])


class FakeEngine:
    """generate(requests) with fixed reward patterns; lengths differ per response."""

    def __init__(self):
        self.rollouts = 0
        self.calls: list[list[Request]] = []

    def __call__(self, requests):
        self.calls.append(list(requests))
        self.rollouts += sum(r.n for r in requests)
        return [Group(r.prompt_id, _rewards(r.prompt_id, r.n),
                      lengths=np.arange(1, r.n + 1) * 10.0) for r in requests]


class ListSource:
    """A finite prompt source in a fixed order."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.pos = 0

    def take(self, k):
        out = self.ids[self.pos : self.pos + k]
        self.pos += len(out)
        return out

    def __len__(self):
        return len(self.ids)


def _pipe(stages, n=4, **kw):
    return Pipeline(stages, group_size=n, max_tokens=100, **kw)


def _statuses(batch):
    return {g.prompt_id: g.status for g in batch.groups + batch.removed}


# --------------------------------------------------------------------------- registry / build


def test_registry_and_build_from_spec_dicts():
    assert set(STAGES) == {"offline_pass_rate", "adaptive_group_size", "reward_shaping",
                           "flat_groups", "history"}
    # the spec's model_dump (all defaults, incl. offline `nodes` and fallback None)
    spec = [
        {"type": "offline_pass_rate", "proxy_model": "policy", "samples_per_prompt": 8,
         "max_pass_rate": 1.0, "min_pass_rate": None, "proxy_cost_ratio": 1.0,
         "reuse_epochs": 1, "temperature": 1.0, "nodes": 1},
        {"type": "adaptive_group_size", "extreme_pass_rate": 0.1,
         "target_mixed_probability": 0.8, "max_n": 64, "budget": 1.5},
        {"type": "reward_shaping", "scope": "all_correct",
         "length": {"coefficient": 0.0, "max_tokens": None},
         "repetition": {"ngram": 4, "coefficient": 0.0}},
        {"type": "flat_groups", "action": "rl_zvp", "oversample": 1.0, "max_refills": 0,
         "fallback": None},
        {"type": "history", "window": 2, "cooldown_steps": 20},
    ]
    pipe = build_pipeline(spec, group_size=16, max_tokens=512, seed=3)
    assert [s.type for s in pipe.stages] == [d["type"] for d in spec]
    assert pipe.flat_stage.fallback == "shrink"
    assert pipe.stages[2].length_max_tokens is None and pipe.ctx.max_tokens == 512
    rep = pipe.report()
    assert [s["type"] for s in rep["stages"]] == [d["type"] for d in spec]
    assert rep["ledger"]["generated"] == 0


@pytest.mark.parametrize(
    "stages",
    [
        [{"type": "nope"}],
        [{"type": "history", "windw": 2}],
        [{"type": "flat_groups", "action": "explode"}],
        [{"type": "reward_shaping", "length": {"coef": 1}}],
        [{"type": "offline_pass_rate", "min_pass_rate": 0.5, "max_pass_rate": 0.5}],
        [{"type": "adaptive_group_size", "extreme_pass_rate": 0.5}],
    ],
)
def test_build_rejects(stages):
    with pytest.raises(ValueError):
        build_pipeline(stages, group_size=4, seed=0)


def test_filters_need_neither_torch_nor_compiler():
    code = ("import sys, runtime.filters, runtime.filters.simulation;"
            "assert 'torch' not in sys.modules, 'torch';"
            "import runtime.advantages, runtime.rewards;"
            "assert not any(m == 'compiler' or m.startswith('compiler.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- offline pass rate


def test_offline_boundaries():
    st_ = OfflinePassRate(samples_per_prompt=8, max_pass_rate=0.875, min_pass_rate=0.125)
    p = np.array([0 / 8, 1 / 8, 2 / 8, 6 / 8, 7 / 8, 8 / 8])
    assert st_.keep_mask(p).tolist() == [False, False, True, True, False, False]
    default = OfflinePassRate()  # max 1.0 drops only p == 1; min None keeps p == 0
    assert default.keep_mask(np.array([0.0, 0.5, 7 / 8, 1.0])).tolist() == [True, True, True,
                                                                             False]
    zero = OfflinePassRate(min_pass_rate=0.0)
    assert zero.keep_mask(np.array([0.0, 1 / 8])).tolist() == [False, True]


def test_offline_run_artifact_and_cost(tmp_path):
    table = {"a": [1, 1, 1, 1], "b": [0, 1, 0, 0], "c": [0, 0, 0, 0], "d": [1, 1, 0, 1]}
    stage = OfflinePassRate(samples_per_prompt=4, min_pass_rate=0.0, proxy_cost_ratio=0.5,
                            reuse_epochs=2, proxy_model="/models/small")
    seen = []

    def sample_fn(ids, k):
        seen.append((list(ids), k))
        return [table[i] for i in ids]

    res = stage.run(list("abcd"), sample_fn)
    assert seen == [(list("abcd"), 4)]
    assert res.pass_rates.tolist() == [1.0, 0.25, 0.0, 0.75]
    assert res.survivors == ["b", "d"]
    assert res.cost == 16 * 0.5 / 2
    assert stage.report()["dropped_too_easy"] == 1 and stage.report()["dropped_hopeless"] == 1
    path = tmp_path / "screen.jsonl"
    res.write_jsonl(path)
    back = ScreenResult.read_jsonl(path)
    assert back.prompt_ids == res.prompt_ids and back.survivors == ["b", "d"]
    assert np.array_equal(back.pass_rates, res.pass_rates) and back.cost == res.cost
    assert back.proxy_model == "/models/small"
    pipe = _pipe([stage, AdaptiveGroupSize()])
    assert pipe.load_screen(back) == ["b", "d"]
    assert pipe.ledger.screening == 4.0 and pipe.ledger.screening_samples == 16
    assert pipe.ledger.prompts_screened_out == 2
    assert pipe.stages[1].estimate("b") == pytest.approx((1 + 0.5) / 5)
    with pytest.raises(ValueError):
        stage.run(["a", "b"], lambda ids, k: [[1, 0], [1]])


def test_offline_screen_of_100k_prompts_samples_in_batches():
    rng = np.random.default_rng(0)
    p = rng.random(100_000)
    pipe = build_pipeline([{"type": "offline_pass_rate", "min_pass_rate": 0.0},
                           {"type": "adaptive_group_size"}], group_size=16, seed=0)
    calls: list[int] = []

    def sample(ids, k):
        calls.append(len(ids))
        return rng.random((len(ids), k)) < p[np.asarray(ids)][:, None]

    res = pipe.screen(list(range(p.size)), sample)
    assert len(res.prompt_ids) == 100_000 and 0 < len(res.survivors) < 100_000
    # the sampler sees whole batches of prompts, not one prompt at a time
    assert len(calls) <= 4 and sum(calls) == 100_000, calls[:10]
    assert pipe.ledger.screening == 800_000


# --------------------------------------------------------------------------- adaptive group size


def test_growth_rule_boundaries_and_tie():
    assert mixed_probability(0.5, 3) == 0.75
    # mix(0.5, 3) == 0.75 exactly: the tie is taken (≥), so n' = 3, not 4
    assert grown_group_size(0.5, 2, 0.75, 64).tolist() == [3]
    assert grown_group_size(0.5, 2, 0.7500001, 64).tolist() == [4]
    assert grown_group_size(0.5, 8, 0.75, 64).tolist() == [8]  # never shrinks
    assert grown_group_size([0.0, 1.0], 4, 0.8, 32).tolist() == [32, 32]  # unreachable: max_n
    assert grown_group_size(0.05, 16, 0.8, 8).tolist() == [16]  # max_n ≤ n
    # closed form: smallest m with 1 − 0.95^m − 0.05^m ≥ 0.8 is 32
    assert grown_group_size(0.05, 16, 0.8, 64).tolist() == [32]
    p = np.linspace(0.01, 0.99, 50)
    got = grown_group_size(p, 4, 0.8, 64)
    for q, m in zip(p, got, strict=True):
        ref = next((k for k in range(4, 65) if 1 - q**k - (1 - q) ** k >= 0.8 - 1e-12), 64)
        assert m == ref


def test_adaptive_extreme_boundaries():
    stage = AdaptiveGroupSize(extreme_pass_rate=0.1, target_mixed_probability=0.8, max_n=64,
                              budget=100.0)
    _pipe([stage], n=4)
    # p̂ = (s + ½)/(t + 1): exactly 0.1, just above 0.1, exactly 0.9, 0.5, unknown
    stage.set_counts("lo", 0.5, 9)
    stage.set_counts("lo+", 0.51, 9)
    stage.set_counts("hi", 8.5, 9)
    stage.set_counts("mid", 4.5, 9)
    assert stage.estimate("lo") == 0.1 and stage.estimate("hi") == 0.9
    reqs = [Request(p, 4) for p in ["lo", "lo+", "hi", "mid", "new"]]
    sizes = [r.n for r in stage.plan(reqs, 0)]
    want = grown_group_size(0.1, 4, 0.8, 64)[0]
    assert sizes == [want, 4, want, 4, 4] and want == 16


def test_adaptive_budget_cap_greedy_is_optimal():
    stage = AdaptiveGroupSize(budget=1.5, max_n=64)
    _pipe([stage], n=4)
    stage.set_counts("a", 0.0, 8)  # p̂ = 1/18
    stage.set_counts("b", 8.0, 8)  # p̂ = 17/18
    stage.set_counts("c", 0.0, 40)  # p̂ = 1/82
    reqs = [Request(p, 4) for p in ["a", "b", "c", "x"]]
    sizes = [r.n for r in stage.plan(reqs, 0)]
    assert sum(sizes) == math.floor(1.5 * 4 * 4) == 24  # cap binds
    assert sizes[3] == 4 and all(s >= 4 for s in sizes)
    assert stage.report()["budget_capped_rounds"] == 1
    # brute force: the greedy allocation maximises Σ mix(p, n_i) under the cap
    p = np.array([stage.estimate(x) for x in "abc"])
    wanted = grown_group_size(p, 4, 0.8, 64)
    best = max(
        sum(mixed_probability(p[i], m[i]) for i in range(3))
        for m in itertools.product(*(range(4, w + 1) for w in wanted))
        if sum(m) <= 20
    )
    got = sum(mixed_probability(p[i], sizes[i]) for i in range(3))
    assert got == pytest.approx(best, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.001, 0.999), min_size=1, max_size=4), st.integers(0, 12))
def test_allocate_budget_properties(ps, extra):
    p = np.array(ps)
    base = np.full(p.size, 2)
    wanted = grown_group_size(p, 2, 0.9, 8)
    sizes = allocate_budget(p, wanted, base, int(base.sum()) + extra)
    assert np.all(sizes >= base) and np.all(sizes <= wanted)
    assert sizes.sum() == min(int(wanted.sum()), int(base.sum()) + extra)
    best = max(sum(mixed_probability(p[i], m[i]) for i in range(p.size))
               for m in itertools.product(*(range(2, w + 1) for w in wanted))
               if sum(m) <= base.sum() + extra)
    assert sum(mixed_probability(p[i], sizes[i]) for i in range(p.size)) >= best - 1e-12


def test_adaptive_online_update():
    stage = AdaptiveGroupSize(estimate_decay=0.5)
    _pipe([stage], n=4)
    stage.set_counts("m1", 2.0, 8.0)
    g = Group("m1", [1, 1, 1, 0])
    stage.process([g], 0)
    assert stage.estimate("m1") == pytest.approx((0.5 * 2 + 3 + 0.5) / (0.5 * 8 + 4 + 1))
    # judge rewards: correctness from the scores, not the (pairwise) rewards
    j = Group("j", [0.0, 0.0], scores=[1.0, 1.0])
    stage.process([j], 0)
    assert stage.estimate("j") == pytest.approx(2.5 / 3)


# --------------------------------------------------------------------------- reward shaping


def test_repeated_ngram_fraction():
    assert repeated_ngram_fraction([1, 2, 3, 1, 2, 3], 3) == 0.25  # 123 231 312 123
    assert repeated_ngram_fraction([5, 5, 5, 5], 1) == 0.75
    assert repeated_ngram_fraction([1, 2], 3) == 0.0
    assert repeated_ngram_fraction([1, 2, 3, 4], 2) == 0.0


def test_reward_shaping_rules():
    stage = RewardShaping(length={"coefficient": 0.1, "max_tokens": 100},
                          repetition={"ngram": 2, "coefficient": 0.2})
    _pipe([stage])
    correct = Group("c", [1, 1], lengths=[50, 100], token_ids=[[1, 2, 3], [1, 2, 1, 2, 1]])
    mixed = Group("m", [1, 0], lengths=[50, 100], token_ids=[[1], [2]])
    wrong = Group("w", [0, 0], lengths=[50, 100], token_ids=[[1], [2]])
    stage.process([correct, mixed, wrong], 0)
    # 1 − 0.1·50/100 − 0.2·0 ;  1 − 0.1·100/100 − 0.2·(4 − 2)/4
    assert correct.rewards.tolist() == pytest.approx([0.95, 0.8])
    assert not correct.flat and correct.raw_rewards.tolist() == [1.0, 1.0]
    assert mixed.rewards.tolist() == [1.0, 0.0] and wrong.rewards.tolist() == [0.0, 0.0]
    assert stage.report()["ties_broken"] == 1


def test_reward_shaping_scope_all_and_still_flat():
    stage = RewardShaping(scope="all", length={"coefficient": 0.5})
    _pipe([stage])  # max_tokens from the pipeline: 100
    mixed = Group("m", [1, 0], lengths=[20, 20])
    wrong = Group("w", [0, 0, 0], lengths=[10, 20, 30])
    same = Group("c", [1, 1], lengths=[40, 40])  # penalties equal: still flat
    stage.process([mixed, wrong, same], 0)
    assert mixed.rewards.tolist() == pytest.approx([0.9, -0.1])
    assert wrong.rewards.tolist() == pytest.approx([-0.05, -0.1, -0.15]) and not wrong.flat
    assert same.rewards.tolist() == [1.0, 1.0] and same.flat  # unshaped rewards kept
    assert stage.report()["still_flat"] == 1


def test_reward_shaping_judge_scores_and_errors():
    stage = RewardShaping(length={"coefficient": 0.1})
    _pipe([stage])
    tie = Group("j", [0.0, 0.0], scores=[1.0, 1.0], token_ids=[[1] * 10, [1] * 30])
    stage.process([tie], 0)  # all correct by score; lengths from token ids
    assert tie.rewards.tolist() == pytest.approx([-0.01, -0.03])
    with pytest.raises(ValueError):
        stage.process([Group("c", [1, 1])], 0)  # no lengths
    rep = RewardShaping(repetition={"coefficient": 0.1})
    _pipe([rep])
    with pytest.raises(ValueError):
        rep.process([Group("c", [1, 1], lengths=[1, 2])], 0)  # no token ids
    no_max = RewardShaping(length={"coefficient": 0.1})
    no_max.bind(Pipeline([], group_size=2).ctx)
    with pytest.raises(ValueError):
        no_max.process([Group("c", [1, 1], lengths=[1, 2])], 0)


# --------------------------------------------------------------------------- flat groups


def test_flat_groups_rl_zvp_and_keep():
    eng = FakeEngine()
    pipe = _pipe([FlatGroups(action="rl_zvp")])
    b = pipe.step(0, ListSource(["m1", "c1", "w1", "h1"]), eng, 4)
    assert _statuses(b) == {"m1": "used", "c1": "reshaped", "w1": "reshaped", "h1": "kept_flat"}
    assert [g.zvp_sign for g in b.groups] == [0, 1, -1, 0]
    rewards, valid, sign = b.padded()
    assert sign.tolist() == [0, 1, -1, 0] and valid.all() and rewards.shape == (4, 4)
    led = b.ledger
    assert (led.used, led.reshaped, led.kept_flat, led.dropped) == (4, 8, 4, 0)
    assert led.wasted == 4
    keep = _pipe([FlatGroups(action="keep", oversample=3.0, max_refills=5)])
    b = keep.step(0, ListSource(["m1", "c1", "w1", "h1", "m2"]), FakeEngine(), 4)
    assert _statuses(b) == {"m1": "used", "c1": "kept_flat", "w1": "kept_flat",
                            "h1": "kept_flat"}  # no over-sampling without drop
    assert b.padded()[2].tolist() == [0, 0, 0, 0]


def test_vanilla_keeps_flat_groups():
    b = _pipe([]).step(0, ListSource(["m1", "c1"]), FakeEngine(), 2)
    assert _statuses(b) == {"m1": "used", "c1": "kept_flat"}
    assert b.ledger.zero_variance == 4 and b.ledger.wasted == 4


def test_drop_oversample_refill_and_discard():
    eng = FakeEngine()
    pipe = _pipe([FlatGroups(action="drop", oversample=1.5, max_refills=1)])
    src = ListSource(["c1", "m1", "w1", "c2", "m2", "m3", "m4", "m5", "m6"])
    b = pipe.step(0, src, eng, 4)
    # round 0: ceil(1.5·4) = 6 prompts → 3 informative; refill ceil(1.5·1) = 2 → 2 more
    assert [len(c) for c in eng.calls] == [6, 2]
    assert [g.prompt_id for g in b.groups] == ["m1", "m2", "m3", "m4"]
    st_ = _statuses(b)
    assert st_["m5"] == "discarded" and st_["c1"] == st_["w1"] == st_["c2"] == "dropped"
    led = b.ledger
    assert led.generated == eng.rollouts == 32 and led.refills == 1
    assert (led.used, led.dropped, led.discarded, led.zero_variance) == (16, 16, 4, 12)
    assert led.wasted == 16 and not led.violations()
    assert b.short == 0


@pytest.mark.parametrize("fallback", ["keep", "rl_zvp", "shrink", "error"])
def test_drop_fallbacks_when_pool_runs_dry(fallback):
    pipe = _pipe([FlatGroups(action="drop", oversample=1.0, max_refills=2, fallback=fallback)])
    src = ListSource(["m1", "c1", "w1", "m2", "h1"])  # only 2 informative prompts exist
    if fallback == "error":
        with pytest.raises(PoolExhausted):
            pipe.step(0, src, FakeEngine(), 4)
        return
    b = pipe.step(0, src, FakeEngine(), 4)
    st_ = _statuses(b)
    assert st_["m1"] == st_["m2"] == "used"
    if fallback == "shrink":
        assert len(b.groups) == 2 and b.short == 2
        assert st_["c1"] == st_["w1"] == st_["h1"] == "dropped"
    elif fallback == "keep":
        assert len(b.groups) == 4 and st_["c1"] == st_["w1"] == "kept_flat"
        assert st_["h1"] == "dropped"
    else:  # rl_zvp: filled in selection order with reshaped groups
        assert st_["c1"] == st_["w1"] == "reshaped" and st_["h1"] == "dropped"
        assert b.padded()[2].tolist() == [0, 1, -1, 0]
    assert not b.ledger.violations()


def test_ledger_books_reshaped_groups_as_their_own_class(tmp_path):
    """A step with informative, dropped-flat and RL-ZVP-reshaped groups: reshaped rollouts
    are neither used nor wasted, to_dict carries them, and the driver's resume pickle keeps
    every count (the next step adds to them)."""
    from runtime.driver_state import DriverState, load_state, save_state

    pipe = _pipe([FlatGroups(action="drop", oversample=1.0, max_refills=2, fallback="rl_zvp")])
    b = pipe.step(0, ListSource(["m1", "c1", "w1", "m2", "h1"]), FakeEngine(), 4)
    assert _statuses(b) == {"m1": "used", "m2": "used", "c1": "reshaped", "w1": "reshaped",
                            "h1": "dropped"}
    led = b.ledger
    assert (led.generated, led.used, led.reshaped, led.kept_flat, led.dropped) == (20, 8, 8, 0, 4)
    assert (led.groups_used, led.groups_reshaped, led.groups_dropped) == (2, 2, 1)
    assert led.wasted == 4 and led.zero_variance == 12  # reshaped: flat, but not wasted
    assert not led.violations()
    d = led.to_dict()
    assert (d["reshaped"], d["groups_reshaped"], d["wasted"]) == (8, 2, 4)
    assert d["used"] + d["reshaped"] + d["wasted"] == d["generated"]

    save_state(tmp_path / "driver.pkl", DriverState(step=1, pipeline=pipe))
    resumed = load_state(tmp_path / "driver.pkl").pipeline
    assert resumed.ledger.to_dict() == pipe.ledger.to_dict()
    assert resumed.ledger.reshaped == 8
    resumed.step(1, ListSource(["m3", "c2", "w2", "m4"]), FakeEngine(), 4)
    assert resumed.ledger.reshaped == 16 and resumed.ledger.used == 16
    assert not resumed.ledger.violations()


def test_drop_refill_limit():
    eng = FakeEngine()
    pipe = _pipe([FlatGroups(action="drop", oversample=1.0, max_refills=1)])
    src = ListSource(["c1", "c2", "c3", "c4", "c5", "m1"])
    b = pipe.step(0, src, eng, 2)
    # 2 rounds of ≤ 2 prompts: both flat, refill once (2 more), still short; shrink
    assert [len(c) for c in eng.calls] == [2, 2] and b.groups == [] and b.short == 2
    assert pipe.flat_stage.report()["pool_dry_steps"] == 1


# --------------------------------------------------------------------------- history


def test_history_skip_and_retry_after_cooldown():
    hist = History(window=2, cooldown_steps=3)
    pipe = _pipe([hist])
    eng = FakeEngine()
    src = PromptStream(["c1", "m1"], shuffle=False)
    visited = []
    for step in range(10):
        b = pipe.step(step, src, eng, 1)
        visited.append([g.prompt_id for g in b.groups])
    # c1 at steps 0 and 2 (flat twice) → cools at steps 3–5, deferred when drawn,
    # retried at step 6 (before fresh prompts), flat again → cools 7–9
    assert visited == [["c1"], ["m1"], ["c1"], ["m1"], ["m1"], ["m1"], ["c1"], ["m1"],
                       ["m1"], ["m1"]]
    rep = hist.report()
    assert rep["cooldowns"] == 2 and rep["retried"] == 1 and rep["skipped"] >= 3
    assert pipe.ledger.prompts_skipped == rep["skipped"]
    assert not hist.cooling("c1", 10) and hist.cooling("c1", 9)


def test_history_informative_visit_clears():
    hist = History(window=2, cooldown_steps=5)
    _pipe([hist])
    hist.process([Group("x", [1, 1])], 0)
    hist.process([Group("x", [1, 0])], 1)
    hist.process([Group("x", [1, 1])], 2)
    assert hist.admit("x", 3)
    hist.process([Group("x", [0, 0])], 3)
    assert not hist.admit("x", 4) and hist.deferred == 1


def test_order_matters_history_vs_shaping():
    def run(order):
        stages = {"shape": RewardShaping(length={"coefficient": 0.1}),
                  "hist": History(window=1, cooldown_steps=5)}
        pipe = _pipe([stages[k] for k in order])
        src = PromptStream(["c1", "m1"], shuffle=False)
        return [[g.prompt_id for g in pipe.step(s, src, FakeEngine(), 1).groups]
                for s in range(4)]

    # history first sees the all-correct group as flat and skips c1; after shaping it is
    # informative (lengths differ), so c1 keeps coming back
    assert run(["hist", "shape"]) == [["c1"], ["m1"], ["m1"], ["m1"]]
    assert run(["shape", "hist"]) == [["c1"], ["m1"], ["c1"], ["m1"]]


def test_select_dedups_and_terminates_when_all_cooling():
    hist = History(window=1, cooldown_steps=100)
    pipe = _pipe([hist])
    eng = FakeEngine()
    src = PromptStream(["c1", "c2"], shuffle=False)
    b = pipe.step(0, src, eng, 5)  # endless stream, 2 prompts: each taken once
    assert sorted(g.prompt_id for g in b.groups) == ["c1", "c2"]
    b = pipe.step(1, src, eng, 2)  # everything cools: an empty step, no endless loop
    assert b.groups == [] and b.ledger.generated == 0


# --------------------------------------------------------------------------- adaptive in the pipeline


def test_adaptive_in_pipeline_counts_grown_rollouts():
    ad = AdaptiveGroupSize(max_n=16, budget=2.0)
    pipe = _pipe([ad], n=4)
    ad.set_counts("c1", 10.0, 10.0)  # p̂ = 10.5/11: grows
    b = pipe.step(0, ListSource(["c1", "m1"]), FakeEngine(), 2)
    assert [g.n for g in b.groups] == [12, 4]  # cap floor(2·2·4) = 16
    assert b.ledger.grown == 8 and b.ledger.generated == 16 and not b.ledger.violations()
    r, valid, _ = b.padded()
    assert r.shape == (2, 12) and valid.sum() == 16


def test_batch_padded_feeds_rl_zvp_advantages():
    import torch

    from runtime.advantages import rl_zvp_token_advantages

    ad = AdaptiveGroupSize(max_n=8, budget=2.0)
    pipe = _pipe([ad, FlatGroups(action="rl_zvp")], n=4)
    ad.set_counts("c1", 10.0, 10.0)
    b = pipe.step(0, ListSource(["c1", "m1", "w1"]), FakeEngine(), 3)
    rewards, valid, sign = b.padded()
    P, G, T = rewards.shape[0], rewards.shape[1], 5
    H = torch.rand(P, G, T, dtype=torch.float64)
    mask = torch.ones(P, G, T, dtype=torch.bool)
    A = rl_zvp_token_advantages(torch.from_numpy(rewards), H, mask, valid=torch.from_numpy(valid),
                                flat_sign=torch.from_numpy(sign))
    assert torch.all(A[0][torch.from_numpy(valid[0])] >= 0)  # all correct: +α·H
    assert torch.all(A[2] <= 0) and torch.all(A[~torch.from_numpy(valid)] == 0)
    assert A[1, 0, 0] > 0 > A[1, 1, 0]


# --------------------------------------------------------------------------- ledger


def test_rollouts_per_informative_group_formula():
    led = Ledger(group_size=16, generated=3200, groups_generated=200, used=1600,
                 groups_used=100, screening=800.0)
    assert rollouts_per_informative_group(led) == (3200 + 800) / (16 * 100)
    assert rollouts_per_informative_group(Ledger(group_size=4)) == math.inf
    led.groups_reshaped = 100
    assert rollouts_per_informative_group(led, count_reshaped=True) == 4000 / 3200
    with pytest.raises(AssertionError):
        Ledger(group_size=2, generated=2, groups_generated=1).check()


_cfgs = st.fixed_dictionaries({
    "action": st.sampled_from(["rl_zvp", "drop", "keep", None]),
    "oversample": st.sampled_from([1.0, 1.3, 2.0]),
    "max_refills": st.integers(0, 2),
    "fallback": st.sampled_from(["keep", "rl_zvp", "shrink"]),
    "adaptive": st.booleans(),
    "history": st.booleans(),
    "shaping": st.booleans(),
})


@settings(max_examples=60, deadline=None)
@given(_cfgs, st.lists(st.sampled_from("mcwh"), min_size=1, max_size=30), st.integers(1, 6),
       st.integers(0, 2**16))
def test_ledger_conservation(cfg, kinds, P, seed):
    """generated == used + reshaped + kept_flat + dropped, discarded ≤ dropped,
    zero_variance == reshaped + kept_flat + dropped − discarded, and generated equals
    what the engine produced — per step and summed over the run."""
    stages = []
    if cfg["adaptive"]:
        ad = AdaptiveGroupSize(max_n=12, budget=1.5)
        stages.append(ad)
    if cfg["shaping"]:
        stages.append(RewardShaping(length={"coefficient": 0.1}))
    if cfg["action"]:
        stages.append(FlatGroups(action=cfg["action"], oversample=cfg["oversample"],
                                 max_refills=cfg["max_refills"], fallback=cfg["fallback"]))
    if cfg["history"]:
        stages.append(History(window=1, cooldown_steps=2))
    pipe = _pipe(stages, n=4, seed=seed)
    if cfg["adaptive"]:
        for i, k in enumerate(kinds):
            ad.set_counts(f"{k}{i}", 8.0 if k == "c" else 0.0, 8.0)
    ids = [f"{k}{i}" for i, k in enumerate(kinds)]
    src = pipe.stream(ids)
    eng = FakeEngine()
    total = Ledger(group_size=4)
    for step in range(4):
        b = pipe.step(step, src, eng, P)
        b.ledger.check()
        total = total + b.ledger
        assert len(b.groups) == b.ledger.groups_used + b.ledger.groups_reshaped + \
            b.ledger.groups_kept_flat
        assert all(g.status in ("used", "reshaped", "kept_flat") for g in b.groups)
        assert all(g.status in ("dropped", "discarded") for g in b.removed)
        assert b.ledger.wasted == sum(g.n for g in b.removed) + b.ledger.kept_flat
    pipe.ledger.check()
    assert pipe.ledger.generated == eng.rollouts == total.generated
    assert pipe.ledger == total  # the run's ledger is the sum of the steps' (no screen)
    assert pipe.ledger.to_dict()["steps"] == 4


# --------------------------------------------------------------------------- simulation


def _pass_rates(N: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kind = rng.random(N)
    return np.where(kind < 0.55, rng.beta(0.3, 12, N),
                    np.where(kind < 0.85, rng.beta(12, 0.3, N), rng.uniform(0.05, 0.95, N)))


ZVE = [
    {"type": "offline_pass_rate", "samples_per_prompt": 8, "max_pass_rate": 1.0,
     "min_pass_rate": 0.0, "proxy_cost_ratio": 0.25},
    {"type": "adaptive_group_size"},
    {"type": "reward_shaping", "length": {"coefficient": 0.05}},
    {"type": "flat_groups", "action": "drop", "oversample": 1.1, "max_refills": 2},
    {"type": "history", "window": 1, "cooldown_steps": 20},
]


def test_simulation_zve_beats_vanilla():
    p = _pass_rates(20_000)
    vanilla = simulate([], p, group_size=16, prompts_per_step=128, seed=1)
    z = vanilla.ledger.zero_variance_rate
    assert 0.6 <= z <= 0.8, z
    assert vanilla.rollouts_per_informative_group == pytest.approx(1 / (1 - z), rel=1e-9)
    zve = simulate(ZVE, p, group_size=16, prompts_per_step=128, seed=1)
    zve.ledger.check()
    assert zve.ledger.screening == 20_000 * 8 * 0.25
    assert zve.rollouts_per_informative_group < 0.8 * vanilla.rollouts_per_informative_group
    assert zve.ledger.zero_variance_rate < 0.2
    # a screen at full policy cost, used for one epoch, can cost more than it saves
    costly = [dict(ZVE[0], proxy_cost_ratio=1.0), *ZVE[1:]]
    full = simulate(costly, p, group_size=16, prompts_per_step=128, seed=1)
    assert full.rollouts_per_informative_group > vanilla.rollouts_per_informative_group


def test_simulation_keeps_hopeless_prompts_grows_them():
    p = _pass_rates(4_000, seed=2)
    stages = [{"type": "offline_pass_rate", "samples_per_prompt": 8, "max_pass_rate": 1.0,
               "proxy_cost_ratio": 0.25},
              {"type": "adaptive_group_size", "budget": 1.5},
              {"type": "flat_groups", "action": "rl_zvp"}]
    res = simulate(stages, p, group_size=16, prompts_per_step=64, seed=0)
    res.ledger.check()
    assert res.ledger.grown > 0 and res.ledger.reshaped > 0
    ad = res.report["stages"][1]
    assert ad["grown_groups"] > 0 and ad["budget_capped_rounds"] > 0
    # every step respects the budget: rollouts ≤ 1.5 · prompts · n
    assert res.ledger.generated <= 1.5 * res.ledger.groups_generated * 16 + 1e-9


def test_simulation_deterministic_with_seed():
    p = _pass_rates(3_000, seed=3)
    a = simulate(ZVE, p, group_size=8, prompts_per_step=32, seed=7)
    b = simulate(ZVE, p, group_size=8, prompts_per_step=32, seed=7)
    c = simulate(ZVE, p, group_size=8, prompts_per_step=32, seed=8)
    assert a.ledger == b.ledger and a.report == b.report
    assert a.ledger != c.ledger


def test_prompt_stream():
    s = PromptStream(range(5), seed=0, epochs=2)
    got = s.take(3) + s.take(10)
    assert len(got) == 10 and sorted(got) == sorted(list(range(5)) * 2) and s.exhausted
    assert s.take(1) == []
    assert PromptStream(range(5), seed=1).take(5) == PromptStream(range(5), seed=1).take(5)
    assert is_flat(np.array([0.3, 0.1 + 0.2])) and not is_flat(np.array([0.3, 0.3 + 1e-6]))

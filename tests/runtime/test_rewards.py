"""Tests of runtime/rewards: verifiers, tie-aware pairwise rewards, judges, composition."""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.advantages import group_advantages
from runtime.rewards import (
    ArithmeticVerifier,
    HTTPJudge,
    Judge,
    JudgeError,
    MathVerifier,
    RewardComposer,
    RuleJudge,
    Verdict,
    Verifier,
    build_reward,
    pairwise_rewards,
    parse_verdict,
)

# --------------------------------------------------------------------------- verifiers


@pytest.mark.parametrize(
    ("response", "reference", "want"),
    [
        ("95", "95", 1.0),
        ("37+58=95", "95", 1.0),
        ("The answer is 95.", "95", 1.0),
        ("I think 94, no wait: 95", "95", 1.0),
        ("95, or maybe 94", "95", 0.0),
        ("95.0", "95", 1.0),
        ("95.5", "95", 0.0),
        ("1,234", "1234", 1.0),
        ("37-58=-21", "-21", 1.0),
        ("37-58=21", "-21", 0.0),
        ("no idea", "95", 0.0),
        ("", "95", 0.0),
    ],
)
def test_arithmetic_verifier(response, reference, want):
    assert ArithmeticVerifier().score("Compute 37+58=", response, reference) == want


def test_arithmetic_reference_from_prompt():
    v = ArithmeticVerifier()
    assert v.score("Compute 12*-3=", "-36", "") == 1.0
    assert v.score("Compute 37-58=", "-21", "") == 1.0
    with pytest.raises(ValueError):
        v.score("hello", "1", "")


@pytest.mark.parametrize(
    ("response", "reference", "want"),
    [
        (r"so the result is \boxed{42}", "42", 1.0),
        (r"\boxed{42.}", "42", 1.0),
        (r"\boxed{ 4 2 }", "42", 1.0),
        (r"\boxed{1,234,567}", "1234567", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
        (r"\boxed{\frac34}", "0.75", 1.0),
        ("The answer is 3/4.", r"\frac{3}{4}", 1.0),
        ("The answer is -2/4", "-0.5", 1.0),
        (r"first \boxed{1} then \boxed{2}", "2", 1.0),
        (r"\boxed{x = 5}", "5", 1.0),
        (r"$\boxed{12\%}$", "12", 1.0),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
        (r"\boxed{\text{(B)}}", "B", 1.0),
        (r"\boxed{(1, 2)}", "(1,2)", 1.0),
        ("0.3333333", "1/3", 1.0),  # numeric tolerance 1e-6
        ("0.33", "1/3", 0.0),
        ("1e3", "1000", 1.0),
        ("after some work we get 17", "17", 1.0),  # no box: last number of the response
        (r"\boxed{18}", "17", 0.0),
        (r"\boxed{}", "17", 0.0),
        ("", "17", 0.0),
        (r"\boxed{\frac{1}{0}}", "1", 0.0),
    ],
)
def test_math_verifier(response, reference, want):
    assert MathVerifier().score("p", response, reference) == want


def test_verifiers_satisfy_protocol():
    assert isinstance(ArithmeticVerifier(), Verifier)
    assert isinstance(MathVerifier(), Verifier)
    assert isinstance(RuleJudge(MathVerifier()), Judge)


# --------------------------------------------------------------------------- pairwise


class MatrixJudge:
    """Verdicts from a fixed antisymmetric preference matrix over response texts; counts calls."""

    def __init__(self, pref: dict[tuple[str, str], int]):
        self.pref = pref
        self.calls: list[tuple[str, str]] = []

    def compare(self, prompt, a, b, reference=None):
        self.calls.append((a, b))
        return Verdict(self.pref[(a, b)])


@st.composite
def _matrices(draw):
    G = draw(st.integers(1, 7))
    names = [f"r{i}" for i in range(G)]
    pref = {}
    for i, j in itertools.combinations(range(G), 2):
        v = draw(st.sampled_from([-1, 0, 1]))
        pref[(names[i], names[j])] = v
        pref[(names[j], names[i])] = -v
    return names, pref


@settings(max_examples=100, deadline=None)
@given(_matrices(), st.booleans())
def test_pairwise_rewards_properties(m, swap):
    names, pref = m
    judge = MatrixJudge(pref)
    r = pairwise_rewards("p", names, judge, swap_positions=swap)
    G = len(names)
    # each unordered pair judged exactly once
    assert len(judge.calls) == G * (G - 1) // 2
    assert len({frozenset(c) for c in judge.calls}) == len(judge.calls)
    # reference: (wins − losses)/(G − 1), ties count nothing
    for i, a in enumerate(names):
        wins = sum(pref[(a, b)] == 1 for b in names if b != a)
        losses = sum(pref[(a, b)] == -1 for b in names if b != a)
        assert r[i] == pytest.approx((wins - losses) / (G - 1) if G > 1 else 0.0)
        assert -1.0 <= r[i] <= 1.0
    assert sum(r) == pytest.approx(0.0, abs=1e-12)  # antisymmetric


def test_pairwise_all_ties_and_swap_order():
    judge = MatrixJudge({(a, b): 0 for a in "xyz" for b in "xyz"})
    assert pairwise_rewards("p", list("xyz"), judge) == [0.0, 0.0, 0.0]
    # swap_positions shows pair (0, 1) as (y, x): i + j odd
    assert ("y", "x") in judge.calls and ("x", "z") in judge.calls
    assert pairwise_rewards("p", ["only"], judge) == [0.0]


def test_pairwise_threads_same_result():
    pref = {}
    names = [f"r{i}" for i in range(6)]
    for i, j in itertools.combinations(range(6), 2):
        pref[(names[i], names[j])] = (i * 7 + j) % 3 - 1
        pref[(names[j], names[i])] = -pref[(names[i], names[j])]
    a = pairwise_rewards("p", names, MatrixJudge(pref))
    b = pairwise_rewards("p", names, MatrixJudge(pref), max_workers=4)
    assert a == b


class ScoreTable:
    def __init__(self, table):
        self.table = table

    def score(self, prompt, response, reference):
        return self.table[response]


def test_rule_judge_tie_margin_boundary():
    judge = RuleJudge(ScoreTable({"a": 0.5, "b": 0.25, "c": 0.2}), tie_margin=0.25)
    assert judge.compare("p", "a", "b") is Verdict.TIE  # difference == margin: tie
    assert judge.compare("p", "a", "c") is Verdict.BETTER
    assert judge.compare("p", "c", "a") is Verdict.WORSE
    assert RuleJudge(ScoreTable({"a": 1.0, "b": 1.0})).compare("p", "a", "b") is Verdict.TIE
    with pytest.raises(ValueError):
        RuleJudge(ScoreTable({}), tie_margin=-1)


def test_advantage_inversion_demo():
    """Near-tied scalar scores + noise: z-scoring gives ±1 advantages of arbitrary sign;
    the ternary judge's tie-aware rewards give near-equal advantages."""
    g = torch.Generator().manual_seed(0)
    G, trials = 8, 50
    names = [f"r{i}" for i in range(G)]

    def judged_advantages(scores: torch.Tensor) -> torch.Tensor:
        judge = RuleJudge(ScoreTable(dict(zip(names, scores.tolist(), strict=True))),
                          tie_margin=0.1)
        return group_advantages(torch.tensor([pairwise_rewards("p", names, judge)]))[0]

    magnitude, agree = [], []
    for _ in range(trials):
        # 8 responses of equal quality; two reward-model readings with noise 0.01
        rm = 0.7 + 0.01 * torch.randn(2, G, generator=g)
        z = group_advantages(rm)
        magnitude.append(float(z.abs().mean()))
        agree.append(float((z[0].sign() == z[1].sign()).float().mean()))
        assert torch.equal(judged_advantages(rm[0]), torch.zeros(G))  # all ties: all equal
        # one clearly better response among near-ties
        rm2 = torch.tensor([0.7] * (G - 1) + [0.95]) + 0.01 * torch.randn(G, generator=g)
        a = judged_advantages(rm2)
        assert a[G - 1] > 0 and torch.all(a[: G - 1] < 0)
        assert float(a[: G - 1].max() - a[: G - 1].min()) == 0.0  # near-ties: equal
        zz = group_advantages(rm2[None])[0]
        assert float(zz[: G - 1].max() - zz[: G - 1].min()) > 0.05  # z-score: noise spread
    assert sum(magnitude) / trials > 0.7  # |A| ≈ 0.8 (unit std) from noise alone
    assert 0.35 < sum(agree) / trials < 0.65  # signs agree only by chance


# --------------------------------------------------------------------------- HTTP judge


class _Handler(BaseHTTPRequestHandler):
    script: ClassVar[list] = []  # (status, content) per request; the last one repeats
    seen: ClassVar[list] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        n = int(self.headers["Content-Length"])
        body = json.loads(self.rfile.read(n))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        idx = min(len(type(self).seen) - 1, len(type(self).script) - 1)
        status, content = type(self).script[idx]
        if status == "sleep":
            threading.Event().wait(0.5)
            status = 200
        if status != 200:
            self.send_response(status)
            self.end_headers()
            return
        if content is None:
            payload = b"not json"
        else:
            payload = json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": content}}]}
            ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def judge_server():
    _Handler.script = [(200, "A")]
    _Handler.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_judge_verdicts_and_key(judge_server, monkeypatch):
    monkeypatch.setenv("RLSPEC_TEST_JUDGE_KEY", "s3cret")
    judge = HTTPJudge(judge_server, "judge-model", "RLSPEC_TEST_JUDGE_KEY", retries=0)
    for content, want in [("A", Verdict.BETTER), (" B.", Verdict.WORSE), ("TIE", Verdict.TIE),
                          ("<think>A or B?</think>\n**B**", Verdict.WORSE),
                          ("I choose A", Verdict.BETTER)]:
        _Handler.script = [(200, content)]
        _Handler.seen = []
        assert judge.compare("Compute 1+1=", "2", "3", reference="2") is want
    path, auth, body = _Handler.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer s3cret"
    assert body["model"] == "judge-model" and body["messages"][0]["role"] == "system"
    assert "[Reference answer]\n2" in body["messages"][1]["content"]
    assert judge.stats()["parse_failures"] == 0


def test_http_judge_parse_failure_is_tie(judge_server):
    judge = HTTPJudge(judge_server + "/v1", "m", retries=0)
    for content in ["A and B are both fine", "maybe", ""]:
        _Handler.script = [(200, content)]
        assert judge.compare("p", "x", "y") is Verdict.TIE
    assert judge.stats()["parse_failures"] == 3
    assert _Handler.seen[0][1] is None  # no key configured: no Authorization header


def test_http_judge_retries_then_succeeds(judge_server):
    _Handler.script = [(500, None), (503, None), (200, "B")]
    judge = HTTPJudge(judge_server + "/v1/chat/completions", "m", retries=2, backoff_s=0.01)
    assert judge.compare("p", "x", "y") is Verdict.WORSE
    assert judge.stats()["retries"] == 2 and len(_Handler.seen) == 3


def test_http_judge_errors(judge_server):
    _Handler.script = [(500, None)]
    judge = HTTPJudge(judge_server, "m", retries=1, backoff_s=0.01)
    with pytest.raises(JudgeError):
        judge.compare("p", "x", "y")
    assert len(_Handler.seen) == 2
    _Handler.script, _Handler.seen = [(401, None)], []
    with pytest.raises(JudgeError):
        judge.compare("p", "x", "y")
    assert len(_Handler.seen) == 1  # a 4xx is a configuration error: no retry
    _Handler.script = [(200, None)]  # malformed body: retried, then an error
    with pytest.raises(JudgeError):
        judge.compare("p", "x", "y")
    _Handler.script = [("sleep", "A")]
    with pytest.raises(JudgeError):
        HTTPJudge(judge_server, "m", retries=0, timeout_s=0.1).compare("p", "x", "y")


def test_http_judge_config_checks(monkeypatch):
    monkeypatch.delenv("RLSPEC_TEST_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="RLSPEC_TEST_MISSING_KEY"):
        HTTPJudge("http://127.0.0.1:1", "m", "RLSPEC_TEST_MISSING_KEY")
    with pytest.raises(ValueError):
        HTTPJudge("ftp://x", "m")


def test_parse_verdict():
    assert parse_verdict("`TIE`") is Verdict.TIE
    assert parse_verdict("tie") is Verdict.TIE
    assert parse_verdict("A, B") is None
    assert parse_verdict("Neither") is None


def test_pairwise_with_http_judge(judge_server):
    _Handler.script = [(200, "TIE")]
    judge = HTTPJudge(judge_server, "m", retries=0)
    assert pairwise_rewards("p", ["a", "b", "c", "d"], judge, max_workers=3) == [0.0] * 4
    assert judge.stats()["calls"] == 6


# --------------------------------------------------------------------------- composer


def test_build_reward_weighted_verifiers():
    comp = build_reward({"verifiers": [{"type": "arithmetic", "weight": 3.0},
                                       {"type": "math", "weight": 1.0}], "judge": None})
    assert comp.reward_range == (0.0, 1.0)
    assert comp.score("Compute 2+2=", "4", "4") == 1.0
    # "4.5" is not an integer (arithmetic 0) and does not match 4 (math 0)
    assert comp.score("Compute 2+2=", "4.5", "4") == 0.0
    # math accepts \frac{8}{2}; the arithmetic verifier reads the last integer "2"
    assert comp.score("Compute 2+2=", r"\boxed{\frac{8}{2}}", "4") == pytest.approx(0.25)
    gr = comp.group_rewards("Compute 2+2=", ["4", "5", "4"], "4")
    assert gr.rewards == gr.scores == [1.0, 0.0, 1.0]


def test_build_reward_rule_judge():
    comp = build_reward({"verifiers": [{"type": "arithmetic"}],
                         "judge": {"type": "rule", "tie_margin": 0.0}})
    assert comp.reward_range == (-1.0, 1.0)
    gr = comp.group_rewards("Compute 2+2=", ["4", "5", "4", "6"], "4")
    assert gr.scores == [1.0, 0.0, 1.0, 0.0]
    assert gr.rewards == pytest.approx([2 / 3, -2 / 3, 2 / 3, -2 / 3])
    flat = comp.group_rewards("Compute 2+2=", ["4", "4"], "4")
    assert flat.rewards == [0.0, 0.0] and flat.scores == [1.0, 1.0]


def test_build_reward_http_judge(judge_server, monkeypatch):
    monkeypatch.setenv("RLSPEC_TEST_JUDGE_KEY", "k")
    _Handler.script = [(200, "A")]
    comp = build_reward({"verifiers": [{"type": "math", "weight": 1.0}],
                         "judge": {"type": "http", "url": judge_server, "model": "m",
                                   "api_key_env": "RLSPEC_TEST_JUDGE_KEY", "tie_margin": 0.0,
                                   "timeout_s": 5.0}})
    assert isinstance(comp.judge, HTTPJudge)
    gr = comp.group_rewards("p", ["x", "y"], "1")
    # "A" always: the first shown wins; pair (0, 1) is shown swapped, so y wins
    assert gr.rewards == [-1.0, 1.0]


def test_judge_parse_failures_are_counted_and_stop_past_the_threshold(judge_server):
    comp = build_reward({"verifiers": [{"type": "math"}],
                         "judge": {"type": "http", "url": judge_server, "model": "m",
                                   "retries": 0, "max_parse_failure_rate": 0.4}})
    _Handler.script = [(200, "A")] * 4 + [(200, "I cannot decide")]  # the last one repeats
    before = comp.judge_counters()
    comp.group_rewards("p", ["w", "x", "y", "z"], "1")  # 6 pairs: 2 unreadable replies
    assert comp.judge_step(before) == {"judge_calls": 6, "judge_parse_failures": 2}
    before = comp.judge_counters()
    comp.group_rewards("p", ["w", "x", "y", "z"], "1")  # 6 unreadable of 6
    with pytest.raises(JudgeError, match=r"6 of 6 replies .*judge\.max_parse_failure_rate = 0\.4"):
        comp.judge_step(before)
    rule = build_reward({"verifiers": [{"type": "math"}], "judge": {"type": "rule"}})
    assert rule.judge_step(rule.judge_counters()) == {}  # nothing to count


class _Client:
    """Rollout engine stand-in: response k of every prompt is the text str(k)."""

    endpoints: ClassVar[list[str]] = ["stand-in"]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts, *, n, sampling, return_routed_experts=False, endpoint=None,
                 on_request=None):
        import numpy as np

        from runtime.rollout.client import Completion

        out = []
        for p in prompts:
            group = []
            for k in range(n):
                ids = self.tokenizer.encode(str(k), add_special_tokens=False)
                group.append(Completion(list(p), ids, np.zeros(len(ids), dtype=np.float32),
                                        None, "stop", None))
            out.append(group)
        return out


@pytest.mark.parametrize("workers", [1, 2])
def test_the_driver_step_counts_judge_failures_and_stops_the_run(judge_server, tmp_path,
                                                                 workers):
    """The RL driver's step (prompts → rollouts → judged rewards → pipeline batch) against a
    judge on 127.0.0.1 that answers garbage: the step's counts go to its metrics line, and
    a step past reward.judge.max_parse_failure_rate stops the run — also when the judge is
    called from 2 reward worker processes (``runtime.scoring``), whose counts reach the
    driver's reward."""
    import contextlib
    from pathlib import Path

    from compiler.api import compile_spec
    from runtime.driver import RLDriver
    from runtime.jobs.common import JobContext
    from runtime.policy import build_tokenizer, save_tokenizer
    from runtime.scoring import ScoringPool

    root = Path(__file__).resolve().parents[2]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": i, "prompt": f"{i}+1=", "answer": str(i + 1)})
                             + "\n" for i in range(6)))
    compiled = compile_spec(root / "examples" / "tiny" / "spec.yaml", [
        "data.generator=null", f"data.train={train}", f"data.eval={train}", "filters=[]",
        "algorithm.advantage.estimator=group", "rollout.prompts_per_step=2", "rollout.n=4",
        "train.global_batch_size=8", "train.micro_batch_size=8",
        f"reward.judge={{type: http, url: '{judge_server}', model: m, "
        "max_parse_failure_rate: 0.4}",
    ])
    config = tmp_path / "b" / "jobs" / "rl" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(compiled.files["jobs/rl/config.json"])
    ctx = JobContext.load(config, run_dir=tmp_path / "run", log_to_file=False)
    tokenizer = build_tokenizer(64)
    save_tokenizer(tokenizer, tmp_path / "tokenizer")
    driver = RLDriver(ctx, client=_Client(tokenizer))
    reward = build_reward(ctx.spec["reward"])
    state = driver._new_state()
    stats = {"tokens": 0, "seconds": 0.0}
    with contextlib.ExitStack() as stack:
        if workers > 1:  # as RLDriver.run makes it for system.reward_workers
            driver.scorer = stack.enter_context(
                ScoringPool(workers, str(tmp_path / "tokenizer"), ctx.spec["reward"]))
        _Handler.script = [(200, "A")] * 9 + [(200, "{}")]  # 2 groups × 6 pairs
        batch, judged = driver._rollouts(state, 0, tokenizer, reward, stats)
        assert len(batch.groups) == 2
        assert judged == {"judge_calls": 12, "judge_parse_failures": 3}
        with pytest.raises(JudgeError,
                           match=r"12 of 12 replies of the judge at http://127\.0\.0\.1"):
            driver._rollouts(state, 1, tokenizer, reward, stats)


def test_build_reward_errors():
    with pytest.raises(ValueError):
        build_reward({"verifiers": []})
    with pytest.raises(ValueError):
        build_reward({"verifiers": [{"type": "nope"}]})
    with pytest.raises(ValueError):
        build_reward({"verifiers": [{"type": "math"}], "judge": {"type": "rule", "bogus": 1}})
    with pytest.raises(ValueError):
        build_reward({"verifiers": [{"type": "math"}], "judge": {"type": "http"}})
    with pytest.raises(ValueError):
        build_reward({"verifiers": [{"type": "math", "weight": 0.0}]})
    with pytest.raises(ValueError):
        build_reward({"verifiers": [{"type": "math"}], "shaping": {}})
    assert isinstance(RewardComposer([(MathVerifier(), 2.0)]).verifiers[0][1], float)

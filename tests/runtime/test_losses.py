"""Tests of runtime/losses.py against slow loop-by-loop references of DESIGN.md §4."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from runtime.losses import (
    LOSSES,
    MAX_LOG_RATIO,
    LossOutput,
    cispo_loss,
    compute_loss,
    espo_high_entropy_mask,
    espo_loss,
    grpo_loss,
    gspo_loss,
    register_loss,
    train_inference_correction,
)

F64 = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-12}

# --------------------------------------------------------------------------- references
# Literal transcriptions of DESIGN.md §4: Python loops over b and t, one scalar at a time.


def _A(adv: torch.Tensor, b: int, t: int) -> torch.Tensor:
    return adv[b] if adv.dim() == 1 else adv[b, t]


def _W(tw: torch.Tensor | None, b: int, t: int) -> float | torch.Tensor:
    return 1.0 if tw is None else tw[b, t]


def _valid(mask: torch.Tensor, b: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if bool(mask[b, t])]


def _o(ratio: torch.Tensor, A: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.minimum(ratio * A, torch.clamp(ratio, lo, hi) * A)


def _zero(logp: torch.Tensor) -> torch.Tensor:
    # A constant 0 attached to logp (so autograd.grad returns zeros).
    return (logp * 0).nan_to_num(0.0).sum()


def ref_grpo(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, tw=None):
    num, n = _zero(logp), 0
    for b in range(logp.shape[0]):
        for t in _valid(mask, b):
            r = torch.exp(logp[b, t] - old[b, t])
            num = num + _W(tw, b, t) * _o(r, _A(adv, b, t), 1 - clip_low, 1 + clip_high)
            n += 1
    return -(num / n) if n else -num


def ref_gspo(logp, old, adv, mask, clip_low=3e-4, clip_high=4e-4, tw=None, eps_per_resp=None):
    """GSPO-token; with ``eps_per_resp`` the clip range of response b is 1 ± eps_per_resp[b]."""
    objs = []
    for b in range(logp.shape[0]):
        idx = _valid(mask, b)
        if not idx:
            continue
        log_s = sum(logp[b, t] - old[b, t] for t in idx) / len(idx)
        lo, hi = 1 - clip_low, 1 + clip_high
        if eps_per_resp is not None:
            lo, hi = 1 - eps_per_resp[b], 1 + eps_per_resp[b]
        acc = 0.0
        for t in idx:
            s = torch.exp(log_s.detach() + logp[b, t] - logp[b, t].detach())
            acc = acc + _W(tw, b, t) * _o(s, _A(adv, b, t), lo, hi)
        objs.append(acc / len(idx))
    return -(sum(objs) / len(objs)) if objs else _zero(logp)


def ref_k(rho: float, L: int) -> int:
    return max(1, math.ceil(rho * L - 1e-9))


def ref_groups(entropy, mask, b, rho) -> tuple[list[int], list[int]]:
    idx = _valid(mask, b)
    k = ref_k(rho, len(idx))
    ranked = sorted(idx, key=lambda t: (-float(entropy[b, t]), t))  # ties: earlier first
    high = sorted(ranked[:k])
    low = [t for t in idx if t not in set(high)]
    return high, low


def ref_espo(logp, old, adv, mask, entropy, alpha=0.02, rho=0.2, V=1000, tw=None):
    objs = []
    for b in range(logp.shape[0]):
        if not _valid(mask, b):
            continue
        group_objs = []
        for group in ref_groups(entropy, mask, b, rho):
            if not group:  # an empty group is dropped
                continue
            log_s = sum(logp[b, t] - old[b, t] for t in group) / len(group)
            eps = alpha * (sum(float(entropy[b, t]) for t in group) / len(group)) / math.log(V)
            acc = 0.0
            for t in group:
                s = torch.exp(log_s.detach() + logp[b, t] - logp[b, t].detach())
                acc = acc + _W(tw, b, t) * _o(s, _A(adv, b, t), 1 - eps, 1 + eps)
            group_objs.append(acc / len(group))
        objs.append(sum(group_objs) / len(group_objs))
    return -(sum(objs) / len(objs)) if objs else _zero(logp)


def ref_cispo(logp, old, adv, mask, eps_high=0.28, eps_low=math.inf, tw=None):
    num, n = _zero(logp), 0
    for b in range(logp.shape[0]):
        for t in _valid(mask, b):
            r = math.exp(float(logp[b, t].detach() - old[b, t]))
            w = min(max(r, 1 - eps_low), 1 + eps_high)
            num = num + _W(tw, b, t) * w * _A(adv, b, t) * logp[b, t]
            n += 1
    return -(num / n) if n else -num


def ref_correction(old, roll, mask, mode, cap=2.0, low=0.5, high=2.0):
    B, T = mask.shape
    new_mask = torch.zeros(B, T, dtype=torch.bool)
    weight = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        for t in _valid(mask, b):
            omega = math.exp(float(old[b, t] - roll[b, t]))
            if mode == "tis":
                new_mask[b, t], weight[b, t] = True, min(omega, cap)
            elif mode == "mis":
                keep = low <= omega <= high
                new_mask[b, t], weight[b, t] = keep, float(keep)
            else:
                new_mask[b, t], weight[b, t] = True, 1.0
    return new_mask, weight


# --------------------------------------------------------------------------- data


def make_batch(
    seed: int,
    B: int,
    T: int,
    *,
    p_valid: float = 0.7,
    empty_rows: tuple[int, ...] = (),
    token_adv: bool = False,
    ties: bool = False,
    negative_entropy: bool = False,
    scale: float = 0.3,
    weights: bool = False,
    poison_padding: bool = False,
    dtype: torch.dtype = F64,
) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < p_valid
    for b in empty_rows:
        mask[b % B] = False
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = old + scale * torch.randn(B, T, generator=g, dtype=F64)
    if poison_padding:  # padding values must never be read
        logp = torch.where(mask, logp, -math.inf)
        old = torch.where(mask, old, math.nan)
    adv = torch.randn((B, T) if token_adv else (B,), generator=g, dtype=F64)
    entropy = torch.rand(B, T, generator=g, dtype=F64) * 3
    if ties:
        entropy = (entropy * 2).round() / 2
    if negative_entropy:  # not physical, but the grouping must still order them right
        entropy = entropy - 1.5
    tw = torch.rand(B, T, generator=g, dtype=F64) * 2 if weights else None
    if poison_padding:
        entropy = torch.where(mask, entropy, math.nan)
        tw = None if tw is None else torch.where(mask, tw, math.inf)
        adv = torch.where(mask, adv, math.nan) if token_adv else adv
    return {
        "logp": logp.to(dtype).requires_grad_(),
        "old": old.to(dtype),
        "adv": adv.to(dtype),
        "mask": mask,
        "entropy": entropy.to(dtype),
        "tw": None if tw is None else tw.to(dtype),
    }


def grad(loss: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, logp, allow_unused=True)
    return torch.zeros_like(logp) if g is None else g


def assert_same(out: LossOutput, ref: torch.Tensor, logp: torch.Tensor) -> None:
    assert isinstance(out, LossOutput)
    assert torch.isfinite(out.loss), out.loss
    torch.testing.assert_close(out.loss, ref.to(out.loss.dtype), **TOL)
    g_out, g_ref = grad(out.loss, logp), grad(ref, logp)
    assert torch.isfinite(g_out).all()
    torch.testing.assert_close(g_out, g_ref, **TOL)
    assert math.isclose(out.metrics["loss"], out.loss.item(), rel_tol=1e-12, abs_tol=1e-15)
    assert all(math.isfinite(v) for v in out.metrics.values()), out.metrics


@st.composite
def batches(draw: st.DrawFn, negative_entropy: bool = False) -> dict:
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 16))
    return make_batch(
        draw(st.integers(0, 2**31 - 1)),
        B,
        T,
        p_valid=draw(st.sampled_from([0.3, 0.7, 1.0])),
        empty_rows=tuple(draw(st.lists(st.integers(0, B - 1), max_size=2))),
        token_adv=draw(st.booleans()),
        ties=draw(st.booleans()),
        negative_entropy=negative_entropy and draw(st.booleans()),
        scale=draw(st.sampled_from([0.05, 0.3, 1.0])),
        weights=draw(st.booleans()),
        poison_padding=draw(st.booleans()),
    )


clips = st.floats(0.0, 0.6)

# --------------------------------------------------------------------------- property tests


@settings(max_examples=40, deadline=None)
@given(x=batches(), clip_low=clips, clip_high=clips)
def test_grpo_matches_reference(x, clip_low, clip_high):
    args = (x["logp"], x["old"], x["adv"], x["mask"])
    out = grpo_loss(*args, clip_low=clip_low, clip_high=clip_high, token_weight=x["tw"])
    assert_same(out, ref_grpo(*args, clip_low, clip_high, x["tw"]), x["logp"])


@settings(max_examples=40, deadline=None)
@given(x=batches(), clip_low=st.sampled_from([3e-4, 0.05, 0.3]), clip_high=clips)
def test_gspo_matches_reference(x, clip_low, clip_high):
    args = (x["logp"], x["old"], x["adv"], x["mask"])
    out = gspo_loss(*args, clip_low=clip_low, clip_high=clip_high, token_weight=x["tw"])
    assert_same(out, ref_gspo(*args, clip_low, clip_high, x["tw"]), x["logp"])


@settings(max_examples=50, deadline=None)
@given(
    x=batches(),
    rho=st.floats(0.0, 1.0, exclude_min=True),
    alpha=st.floats(0.01, 3.0),
    V=st.integers(2, 200_000),
)
def test_espo_matches_reference(x, rho, alpha, V):
    args = (x["logp"], x["old"], x["adv"], x["mask"], x["entropy"])
    out = espo_loss(
        *args, alpha=alpha, high_entropy_fraction=rho, vocab_size=V, token_weight=x["tw"]
    )
    assert_same(out, ref_espo(*args, alpha, rho, V, x["tw"]), x["logp"])


@settings(max_examples=30, deadline=None)
@given(x=batches(), eps_high=clips, eps_low=st.sampled_from([math.inf, 0.2, 0.5, 2.0]))
def test_cispo_matches_reference(x, eps_high, eps_low):
    args = (x["logp"], x["old"], x["adv"], x["mask"])
    out = cispo_loss(*args, eps_high=eps_high, eps_low=eps_low, token_weight=x["tw"])
    assert_same(out, ref_cispo(*args, eps_high, eps_low, x["tw"]), x["logp"])


@settings(max_examples=30, deadline=None)
@given(
    x=batches(negative_entropy=True),
    rho=st.floats(0.0, 1.0, exclude_min=True),
    mode=st.sampled_from(["none", "tis", "mis"]),
)
def test_high_entropy_mask_and_correction_match_reference(x, rho, mode):
    mask, H = x["mask"], x["entropy"]
    high = espo_high_entropy_mask(H, mask, rho)
    for b in range(mask.shape[0]):
        expected = ref_groups(H, mask, b, rho)[0] if _valid(mask, b) else []
        assert torch.nonzero(high[b]).flatten().tolist() == expected
    roll = x["old"] + 0.5 * torch.randn_like(x["old"])
    c = train_inference_correction(x["old"], roll, mask, mode=mode, cap=1.5, low=0.7, high=1.6)
    m_ref, w_ref = ref_correction(x["old"], roll, mask, mode, cap=1.5, low=0.7, high=1.6)
    assert torch.equal(c.mask, m_ref)
    torch.testing.assert_close(c.token_weight, w_ref, **TOL)
    assert not c.token_weight.requires_grad
    assert all(math.isfinite(v) for v in c.metrics.values())


# --------------------------------------------------------------------------- limits


def test_espo_rho_one_is_gspo_with_entropy_scaled_eps():
    x = make_batch(1, 5, 9, empty_rows=(3,), weights=True)
    alpha, V = 0.7, 50
    args = (x["logp"], x["old"], x["adv"], x["mask"])
    eps = []
    for b in range(5):
        idx = _valid(x["mask"], b)
        h = sum(float(x["entropy"][b, t]) for t in idx) / max(len(idx), 1)
        eps.append(alpha * h / math.log(V))
    out = espo_loss(
        *args, x["entropy"], alpha=alpha, high_entropy_fraction=1.0, vocab_size=V,
        token_weight=x["tw"],
    )  # fmt: skip
    assert_same(out, ref_gspo(*args, tw=x["tw"], eps_per_resp=eps), x["logp"])
    assert out.metrics["n_tokens/low"] == 0 and out.metrics["eps/low"] == 0.0
    assert out.metrics["n_tokens/high"] == out.metrics["n_tokens"]


def test_espo_one_token_groups_is_token_level():
    # Responses of 1 or 2 valid tokens and ρ = 0.5: every group holds one token.
    g = torch.Generator().manual_seed(3)
    B, T = 6, 5
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, ts in enumerate([[0, 1], [2], [1, 4], [3], [0, 3], []]):
        mask[b, ts] = True
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    logp = (old + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_()
    adv = torch.randn(B, generator=g, dtype=F64)
    H = torch.rand(B, T, generator=g, dtype=F64) * 4
    alpha, V = 1.5, 20

    # Token-level reference: per token r_t, ε_t = α·H_t/ln V; mean over tokens, then over b.
    objs = []
    for b in range(B):
        idx = _valid(mask, b)
        if idx:
            terms = []
            for t in idx:
                r = torch.exp(logp[b, t] - old[b, t])
                eps = alpha * float(H[b, t]) / math.log(V)
                terms.append(_o(r, adv[b], 1 - eps, 1 + eps))
            objs.append(sum(terms) / len(terms))
    ref = -sum(objs) / len(objs)
    out = espo_loss(logp, old, adv, mask, H, alpha=alpha, high_entropy_fraction=0.5, vocab_size=V)
    assert_same(out, ref, logp)


def test_gspo_one_token_responses_equal_grpo():
    g = torch.Generator().manual_seed(4)
    B, T = 8, 6
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = True
    old = -torch.rand(B, T, generator=g, dtype=F64)
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_()
    adv = torch.randn(B, generator=g, dtype=F64)
    a = gspo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    b = grpo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(a.loss, b.loss, **TOL)
    torch.testing.assert_close(grad(a.loss, logp), grad(b.loss, logp), **TOL)
    assert 0 < a.metrics["clip_frac"] == b.metrics["clip_frac"] < 1


def test_espo_tie_rule_earlier_positions_first():
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    H = torch.tensor([[0.5, 0.5, 9.0, 0.5, 0.5, 0.5, 9.0], [2.0, 1.0, 3.0, 1.0, 3.0, 1.0, 1.0]])
    high = espo_high_entropy_mask(H, mask, 0.4)  # L = 5, 6 → k = 2, 3
    assert torch.nonzero(high[0]).flatten().tolist() == [0, 1]  # all equal: first two valid
    assert torch.nonzero(high[1]).flatten().tolist() == [1, 2, 4]  # 3, 3, then first valid 1.0
    # −0.0 ties with +0.0; half-precision entropies keep their (coarse) ties.
    z = torch.tensor([[0.0, -0.0, 0.0, -1e-9, 0.0]])
    assert espo_high_entropy_mask(z, torch.ones(1, 5, dtype=torch.bool), 0.4)[0].tolist() == [
        True, True, False, False, False,
    ]  # fmt: skip
    hb = torch.tensor([[1.0, 1.001, 1.002, 0.5]], dtype=torch.bfloat16)  # all three equal 1.0
    assert espo_high_entropy_mask(hb, torch.ones(1, 4, dtype=torch.bool), 0.5)[0].tolist() == [
        True, True, False, False,
    ]  # fmt: skip
    # Through the loss: high group = the first two tokens (metrics count them).
    x = make_batch(0, 2, 7)
    out = espo_loss(
        x["logp"], x["old"], x["adv"], mask, H, high_entropy_fraction=0.4, vocab_size=10
    )
    assert out.metrics["n_tokens/high"] == 5 and out.metrics["n_tokens/low"] == 6
    assert_same(
        out,
        ref_espo(x["logp"], x["old"], x["adv"], mask, H, 0.02, 0.4, 10),
        x["logp"],
    )


def test_espo_k_rounding():
    mask = torch.ones(1, 100, dtype=torch.bool)
    H = torch.arange(100, dtype=F64)[None, :]
    assert 100 * 0.07 > 7  # float rounding: 7.000000000000001
    assert int(espo_high_entropy_mask(H, mask, 0.07).sum()) == 7
    assert int(espo_high_entropy_mask(H, mask, 0.2).sum()) == 20
    assert int(espo_high_entropy_mask(H, mask, 0.201).sum()) == 21
    assert int(espo_high_entropy_mask(H[:, :1], mask[:, :1], 1e-6).sum()) == 1


# --------------------------------------------------------------------------- correction


@pytest.mark.parametrize("mode", ["none", "tis", "mis"])
def test_correction_composes_with_losses(mode):
    x = make_batch(5, 4, 8, empty_rows=(2,))
    # seeded: the global RNG's state depends on which tests ran before in this worker
    noise = torch.randn(x["old"].shape, generator=torch.Generator().manual_seed(7),
                        dtype=x["old"].dtype)
    roll = x["old"] + 0.6 * noise
    c = train_inference_correction(x["old"], roll, x["mask"], mode=mode)
    m_ref, w_ref = ref_correction(x["old"], roll, x["mask"], mode)
    args = (x["logp"], x["old"], x["adv"])
    # GRPO: Σ_kept w·o / n_kept; tokens removed by MIS leave the denominator.
    out = grpo_loss(*args, c.mask, token_weight=c.token_weight)
    assert_same(out, ref_grpo(*args, m_ref, tw=w_ref), x["logp"])
    out = espo_loss(*args, c.mask, x["entropy"], vocab_size=100, token_weight=c.token_weight)
    ref = ref_espo(*args, m_ref, x["entropy"], V=100, tw=w_ref)
    assert_same(out, ref, x["logp"])
    n = int(x["mask"].sum())
    assert c.metrics["correction/n_tokens"] == n
    assert c.metrics["correction/frac_masked"] == pytest.approx(1 - int(m_ref.sum()) / n)
    kept = m_ref
    assert c.metrics["correction/mean_weight"] == pytest.approx(float(w_ref[kept].mean()))
    if mode == "tis":
        omega = torch.exp(x["old"] - roll)[x["mask"]]
        assert c.metrics["correction/frac_capped"] == pytest.approx(
            float((omega > 2).double().mean())
        )
        assert c.metrics["correction/mean_raw_weight"] == pytest.approx(float(omega.mean()))
    if mode == "mis":
        assert 0 < c.metrics["correction/frac_masked"] < 1


def test_correction_float_mask_and_validation():
    x = make_batch(6, 3, 5)
    roll = x["old"] + 0.5
    fm = x["mask"].to(F64)
    c = train_inference_correction(x["old"], roll, fm, mode="mis", low=0.5, high=0.7)
    assert c.mask.dtype == F64
    assert torch.equal(
        c.mask.bool(), ref_correction(x["old"], roll, x["mask"], "mis", 2, 0.5, 0.7)[0]
    )
    c = train_inference_correction(x["old"], None, x["mask"])
    assert torch.equal(c.mask, x["mask"]) and torch.equal(c.token_weight, fm)
    with pytest.raises(ValueError, match="mode"):
        train_inference_correction(x["old"], roll, x["mask"], mode="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rollout_logp"):
        train_inference_correction(x["old"], None, x["mask"], mode="tis")
    with pytest.raises(ValueError, match="low"):
        train_inference_correction(x["old"], roll, x["mask"], mode="mis", low=3.0, high=2.0)
    with pytest.raises(ValueError, match="cap"):
        train_inference_correction(x["old"], roll, x["mask"], mode="tis", cap=0.0)


# --------------------------------------------------------------------------- edge cases

ALL = ["grpo", "gspo", "espo", "cispo"]


def _call(name: str, x: dict, **kw) -> LossOutput:
    return compute_loss(
        name,
        kw,
        logp=x["logp"],
        old_logp=x["old"],
        advantages=x["adv"],
        mask=x["mask"],
        entropy=x["entropy"],
        vocab_size=1000,
        token_weight=x["tw"],
    )


@pytest.mark.parametrize("name", ALL)
def test_all_masked_rows_and_batches(name):
    x = make_batch(7, 4, 6, empty_rows=(0, 2), poison_padding=True)
    out = _call(name, x)
    assert torch.isfinite(out.loss)
    g = grad(out.loss, x["logp"])
    assert torch.isfinite(g).all() and (g[0] == 0).all() and (g[2] == 0).all()
    assert out.metrics["n_responses"] == 2
    # Nothing valid at all: loss 0, zero gradient, finite metrics.
    x["mask"] = torch.zeros_like(x["mask"])
    out = _call(name, x)
    assert out.loss.item() == 0.0
    assert (grad(out.loss, x["logp"]) == 0).all()
    assert out.metrics["n_tokens"] == 0 and all(math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("name", ALL)
def test_long_responses_large_log_ratios_stay_finite(name):
    B, T = 2, 32768
    g = torch.Generator().manual_seed(8)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T // 3 :] = False
    old = -torch.rand(B, T, generator=g) * 5 - 100.0
    # Mean log ratio 5 (Σ ≈ 1.6e5: a product of ratios would overflow), spikes of ±120.
    log_r = 5.0 + torch.randn(B, T, generator=g)
    log_r[:, ::97] = 120.0
    log_r[:, 1::89] = -120.0
    logp = (old + log_r).requires_grad_()
    x = {
        "logp": logp,
        "old": old,
        "adv": torch.tensor([-1.0, 0.5]),
        "mask": mask,
        "entropy": torch.rand(B, T, generator=g) * 8,
        "tw": None,
    }
    out = _call(name, x)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grad(out.loss, logp)).all()
    assert all(math.isfinite(v) for v in out.metrics.values()), out.metrics
    assert out.metrics["ratio/max"] <= math.exp(MAX_LOG_RATIO) * (1 + 1e-6)
    if name == "gspo":
        # s_b = exp(mean log ratio): finite and equal to the log-space value.
        for b in range(B):
            lr = log_r[b][mask[b]].double()
            s = math.exp(float(lr.mean()))
            assert math.isfinite(s)
        # A < 0 on response 0 and s ≫ 1 + clip_high: unclipped branch, o = s·A.
        out0 = gspo_loss(logp[:1], old[:1], x["adv"][:1], mask[:1])
        s0 = math.exp(float(log_r[0].double().mean()))
        assert out0.loss.item() == pytest.approx(s0, rel=1e-3)


def test_one_token_responses_everywhere():
    x = make_batch(9, 5, 1, p_valid=1.0)
    for name in ALL:
        out = _call(name, x)
        assert torch.isfinite(out.loss) and torch.isfinite(grad(out.loss, x["logp"])).all()


def test_precision_promotion_and_float_mask():
    x = make_batch(10, 3, 6, weights=True)
    xf = dict(x, mask=x["mask"].to(torch.float32))
    for name in ALL:
        torch.testing.assert_close(_call(name, x).loss, _call(name, xf).loss, **TOL)
    xh = {
        k: (
            v.detach().to(torch.bfloat16)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
        )
        for k, v in x.items()
    }
    xh["logp"].requires_grad_()
    for name in ALL:
        out = _call(name, xh)
        assert out.loss.dtype == torch.float32
        g = grad(out.loss, xh["logp"])
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        torch.testing.assert_close(
            g.double(), grad(_call(name, x).loss, x["logp"]), rtol=0.05, atol=1e-3
        )


def test_espo_entropy_more_precise_than_logp():
    # float32 logp, float64 entropies that differ only beyond float32 precision.
    x = make_batch(17, 3, 9, dtype=torch.float32)
    H = torch.full((3, 9), 1.0, dtype=F64) + torch.arange(9, dtype=F64) * 1e-12
    high = espo_high_entropy_mask(H, x["mask"], 0.3)
    for b in range(3):
        expected = ref_groups(H, x["mask"], b, 0.3)[0] if _valid(x["mask"], b) else []
        assert torch.nonzero(high[b]).flatten().tolist() == expected
    out = espo_loss(
        x["logp"], x["old"], x["adv"], x["mask"], H, high_entropy_fraction=0.3, vocab_size=7
    )
    assert out.loss.dtype == torch.float32
    ref = ref_espo(
        x["logp"].double().detach().requires_grad_(), x["old"].double(), x["adv"].double(),
        x["mask"], H, 0.02, 0.3, 7,
    )  # fmt: skip
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(2, 0), (0, 3)])
def test_empty_shapes(shape):
    x = make_batch(15, *shape)
    for name in ALL:
        out = _call(name, x)
        assert float(out.loss.detach()) == 0.0
        assert grad(out.loss, x["logp"]).shape == shape


def test_metrics_keys_and_values():
    x = make_batch(11, 4, 9, empty_rows=(1,), scale=0.5)
    common = {
        "loss", "n_tokens", "n_responses", "ratio/mean", "ratio/min", "ratio/max",
        "approx_kl", "clip_frac",
    }  # fmt: skip
    espo_extra = {
        f"{k}/{g}" for k in ("clip_frac", "eps", "n_tokens", "entropy") for g in ("high", "low")
    }
    assert set(_call("grpo", x).metrics) == common
    assert set(_call("gspo", x).metrics) == common
    assert set(_call("cispo", x).metrics) == common | {"is_weight/mean"}
    out = _call("espo", x, alpha=0.5, high_entropy_fraction=0.3)
    assert set(out.metrics) == common | espo_extra

    m, H = x["mask"], x["entropy"]
    V, alpha, rho = 1000, 0.5, 0.3
    eps_h, eps_l, n_h, n_l, clip_h, clip_l, ratios = [], [], 0, 0, 0, 0, []
    for b in range(4):
        if not _valid(m, b):
            continue
        for group, eps_list, which in zip(
            ref_groups(H, m, b, rho), (eps_h, eps_l), "hl", strict=True
        ):
            if not group:
                continue
            eps = alpha * float(H[b, group].mean()) / math.log(V)
            eps_list.append(eps)
            s = math.exp(float((x["logp"][b, group].detach() - x["old"][b, group]).mean()))
            ratios += [s] * len(group)
            A = float(x["adv"][b])
            clipped = (A > 0 and s > 1 + eps) or (A < 0 and s < 1 - eps)
            if which == "h":
                n_h, clip_h = n_h + len(group), clip_h + clipped * len(group)
            else:
                n_l, clip_l = n_l + len(group), clip_l + clipped * len(group)
    mt = out.metrics
    assert mt["n_tokens"] == int(m.sum()) == n_h + n_l
    assert mt["n_responses"] == 3
    assert (mt["n_tokens/high"], mt["n_tokens/low"]) == (n_h, n_l)
    assert mt["eps/high"] == pytest.approx(sum(eps_h) / len(eps_h))
    assert mt["eps/low"] == pytest.approx(sum(eps_l) / len(eps_l))
    assert mt["clip_frac/high"] == pytest.approx(clip_h / n_h)
    assert mt["clip_frac/low"] == pytest.approx(clip_l / n_l)
    assert mt["clip_frac"] == pytest.approx((clip_h + clip_l) / (n_h + n_l))
    assert mt["ratio/mean"] == pytest.approx(sum(ratios) / len(ratios))
    assert mt["ratio/max"] == pytest.approx(max(ratios))
    assert mt["entropy/high"] > mt["entropy/low"]
    lr = (x["logp"].detach() - x["old"])[m]
    assert mt["approx_kl"] == pytest.approx(float(-lr.mean()))
    g = _call("grpo", x).metrics
    assert g["ratio/mean"] == pytest.approx(float(lr.exp().mean()))


@pytest.mark.parametrize("name", ALL)
def test_zero_advantage_is_never_clipped(name):
    # A = 0: o = 0 and no gradient, and the token is not counted as clipped.
    x = make_batch(16, 3, 8, scale=2.0, p_valid=1.0)
    x["adv"] = torch.zeros_like(x["adv"])
    out = _call(name, x, **({"eps_low": 0.2} if name == "cispo" else {}))
    assert float(out.loss.detach()) == 0.0
    assert (grad(out.loss, x["logp"]) == 0).all()
    if name != "cispo":  # CISPO's clip_frac counts clipped IS weights, whatever A
        assert out.metrics["clip_frac"] == 0.0


# --------------------------------------------------------------------------- registry


def test_registry_defaults_match_signatures_and_spec():
    from spec import models

    assert set(LOSSES) == set(ALL)
    sections = {
        "grpo": models.GRPOParams,
        "gspo": models.GSPOParams,
        "espo": models.ESPOParams,
        "cispo": models.CISPOParams,
    }
    for name, spec in LOSSES.items():
        params = inspect.signature(spec.fn).parameters
        for k, v in spec.defaults.items():
            assert params[k].default == v
        assert set(spec.defaults) == set(sections[name].model_fields), name
        assert spec.needs_entropy == (name == "espo")
        assert spec.needs_vocab_size == (name == "espo")
    assert LOSSES["espo"].defaults == {"alpha": 0.02, "high_entropy_fraction": 0.2}
    assert LOSSES["grpo"].defaults == {"clip_low": 0.2, "clip_high": 0.28}
    assert LOSSES["gspo"].defaults == {"clip_low": 3e-4, "clip_high": 4e-4}
    assert LOSSES["cispo"].defaults == {"eps_high": 0.28, "eps_low": math.inf}


def test_compute_loss_dispatch_and_validation():
    x = make_batch(12, 3, 7, weights=True)
    args = (x["logp"], x["old"], x["adv"], x["mask"])
    direct = grpo_loss(*args, clip_low=0.1, token_weight=x["tw"])
    torch.testing.assert_close(_call("grpo", x, clip_low=0.1).loss, direct.loss, **TOL)
    direct = espo_loss(*args, x["entropy"], vocab_size=1000, token_weight=x["tw"])
    torch.testing.assert_close(_call("espo", x).loss, direct.loss, **TOL)
    # The spec's CISPO section uses eps_low: null for "unbounded below".
    torch.testing.assert_close(_call("cispo", x, eps_low=None).loss, _call("cispo", x).loss, **TOL)
    with pytest.raises(ValueError, match=r"unknown parameter.*'clip_ratio'.*clip_high"):
        _call("grpo", x, clip_ratio=0.2)
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        compute_loss(
            "ppo", {}, logp=x["logp"], old_logp=x["old"], advantages=x["adv"], mask=x["mask"]
        )
    with pytest.raises(ValueError, match="entropy"):
        compute_loss(
            "espo",
            {},
            logp=x["logp"],
            old_logp=x["old"],
            advantages=x["adv"],
            mask=x["mask"],
            vocab_size=10,
        )
    with pytest.raises(ValueError, match="vocab_size"):
        compute_loss(
            "espo",
            {},
            logp=x["logp"],
            old_logp=x["old"],
            advantages=x["adv"],
            mask=x["mask"],
            entropy=x["entropy"],
        )
    for name, bad in [
        ("grpo", {"clip_low": -0.1}),
        ("grpo", {"clip_high": "0.2"}),
        ("espo", {"high_entropy_fraction": 0.0}),
        ("espo", {"high_entropy_fraction": 1.5}),
        ("espo", {"alpha": math.nan}),
        ("cispo", {"eps_high": -1.0}),
    ]:
        with pytest.raises(ValueError):
            _call(name, x, **bad)
    with pytest.raises(ValueError, match="vocab_size"):
        espo_loss(*args, x["entropy"], vocab_size=1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x["logp"], x["old"], x["adv"][:2], x["mask"])
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(x["logp"], x["old"][:, :3], x["adv"], x["mask"])


def test_register_loss_decorator():
    @register_loss("test_only_neg_grpo")
    def neg(logp, old_logp, advantages, mask, *, clip_low=0.1, token_weight=None):
        out = grpo_loss(logp, old_logp, advantages, mask, clip_low=clip_low)
        return LossOutput(-out.loss, out.metrics)

    try:
        spec = LOSSES["test_only_neg_grpo"]
        assert spec.defaults == {"clip_low": 0.1} and not spec.needs_entropy
        x = make_batch(13, 2, 4)
        out = compute_loss(
            "test_only_neg_grpo", {"clip_low": 0.3},
            logp=x["logp"], old_logp=x["old"], advantages=x["adv"], mask=x["mask"],
        )  # fmt: skip
        ref = grpo_loss(x["logp"], x["old"], x["adv"], x["mask"], clip_low=0.3).loss
        torch.testing.assert_close(out.loss, -ref)
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_only_neg_grpo")(neg)
    finally:
        LOSSES.pop("test_only_neg_grpo", None)


class _OpCount(TorchDispatchMode):
    """Counts the torch operators dispatched inside the block (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_every_loss_is_vectorised_over_responses_and_tokens():
    # A Python loop over responses or tokens would dispatch more operators for a bigger batch
    # (speed itself is measured by bench/losses.py, not here).
    for name in ALL:
        counts = []
        for b, t in ((4, 64), (64, 256)):
            x = make_batch(14, b, t, dtype=torch.float32)
            with _OpCount() as ops:
                _call(name, x).loss.backward()
            counts.append(ops.n)
        assert counts[0] == counts[1], (name, counts)

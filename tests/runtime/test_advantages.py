"""Tests of runtime/advantages.py against loop references of DESIGN.md §4."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.advantages import (
    FLAT_TOL,
    group_advantages,
    rl_zvp_token_advantages,
    zero_variance_groups,
)

F64 = torch.float64

# --------------------------------------------------------------------------- references


def _ref_flat(vals: list[float]) -> bool:
    if len(vals) < 2:
        return True
    scale = max(1.0, max(abs(x) for x in vals))
    return max(vals) - min(vals) <= FLAT_TOL * scale


def ref_group_advantages(rewards, eps=1e-6, valid=None):
    P, G = rewards.shape
    out = torch.zeros(P, G, dtype=F64)
    for p in range(P):
        idx = [g for g in range(G) if valid is None or bool(valid[p, g])]
        vals = [float(rewards[p, g]) for g in idx]
        if _ref_flat(vals):
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((x - mean) ** 2 for x in vals) / len(vals))
        for g in idx:
            out[p, g] = (float(rewards[p, g]) - mean) / (std + eps)
    return out


def ref_rl_zvp(rewards, entropy, mask, alpha, rmax, rmin, eps=1e-6):
    P, G = rewards.shape
    T = entropy.shape[-1]
    ga = ref_group_advantages(rewards, eps)
    out = torch.zeros(P, G, T, dtype=F64)
    for p in range(P):
        vals = [float(x) for x in rewards[p]]
        flat = _ref_flat(vals)
        for g in range(G):
            valid_t = [t for t in range(T) if bool(mask[p, g, t])]
            if not valid_t:
                continue
            hmax = max(float(entropy[p, g, t]) for t in valid_t)
            for t in valid_t:
                h = float(entropy[p, g, t])
                if not flat:
                    out[p, g, t] = ga[p, g]
                elif abs(vals[0] - rmax) <= FLAT_TOL * max(1.0, abs(rmax)):
                    out[p, g, t] = alpha * h
                elif abs(vals[0] - rmin) <= FLAT_TOL * max(1.0, abs(rmin)):
                    out[p, g, t] = -alpha * (hmax - h)
    return out


# --------------------------------------------------------------------------- group advantages


def test_group_advantages_basic():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    a = group_advantages(r)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(a[1], torch.zeros(4)) and torch.equal(a[2], torch.zeros(4))
    assert zero_variance_groups(r).tolist() == [False, True, True]


def test_flat_tolerance_float_noise():
    r = torch.tensor([[0.1 + 0.2, 0.3, 0.3]], dtype=F64)  # 0.30000000000000004 vs 0.3
    assert bool(zero_variance_groups(r)[0])
    assert torch.equal(group_advantages(r), torch.zeros(1, 3, dtype=F64))
    r2 = torch.tensor([[0.3, 0.3 + 1e-6, 0.3]], dtype=F64)  # a real (tiny) difference
    assert not bool(zero_variance_groups(r2)[0])
    assert group_advantages(r2).abs().max() < 1.0  # eps keeps tiny differences small


def test_group_advantages_dtypes_and_detach():
    r = torch.tensor([[1, 0, 1]], dtype=torch.int64)
    assert group_advantages(r).dtype == torch.float32
    rr = torch.rand(3, 4, dtype=F64, requires_grad=True)
    a = group_advantages(rr)
    assert a.dtype == F64 and not a.requires_grad


def test_group_advantages_ragged_valid():
    torch.manual_seed(0)
    r = torch.rand(6, 5, dtype=F64)
    valid = torch.rand(6, 5) < 0.7
    valid[0] = False
    valid[1] = torch.tensor([True, False, False, False, False])
    got = group_advantages(r, valid=valid)
    assert torch.allclose(got, ref_group_advantages(r, valid=valid), atol=1e-12)
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError):
        rl_zvp_token_advantages(torch.zeros(2, 3), torch.zeros(5, 4), torch.ones(5, 4),
                                reward_max=1.0, reward_min=0.0)
    with pytest.raises(ValueError):
        rl_zvp_token_advantages(torch.zeros(2, 3), torch.zeros(6, 4), torch.ones(6, 4))


# --------------------------------------------------------------------------- RL-ZVP


def test_rl_zvp_branches_exact():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5]], dtype=F64)
    H = torch.tensor([0.2, 0.5, 0.1, 9.0], dtype=F64).expand(4, 2, 4).clone()
    mask = torch.tensor([1, 1, 1, 0], dtype=torch.bool).expand(4, 2, 4).clone()
    H[..., 3] = float("nan")  # padding is never read
    A = rl_zvp_token_advantages(rewards, H, mask, alpha_zvp=0.1, reward_max=1.0, reward_min=0.0)
    assert torch.allclose(A[0, 0], torch.tensor([0.02, 0.05, 0.01, 0.0], dtype=F64))
    # negative branch: −α·(max over valid tokens (0.5) − H_t); token 1 (the max) gets 0
    assert torch.allclose(A[1, 1], torch.tensor([-0.03, 0.0, -0.04, 0.0], dtype=F64))
    ga = group_advantages(rewards[2:3])[0]
    assert torch.allclose(A[2, 0, :3], ga[0].expand(3)) and A[2, 0, 3] == 0
    assert torch.equal(A[3], torch.zeros(2, 4, dtype=F64))  # flat between min and max
    assert not A.isnan().any()


def test_rl_zvp_flat_layout_and_sign_override():
    torch.manual_seed(1)
    P, G, T = 3, 4, 6
    rewards = torch.tensor([[1.0] * 4, [0.0] * 4, [0.0, 1.0, 1.0, 0.0]], dtype=F64)
    H = torch.rand(P, G, T, dtype=F64)
    mask = torch.rand(P, G, T) < 0.8
    a3 = rl_zvp_token_advantages(rewards, H, mask, reward_max=1.0, reward_min=0.0)
    a2 = rl_zvp_token_advantages(rewards, H.reshape(P * G, T), mask.reshape(P * G, T),
                                 reward_max=1.0, reward_min=0.0)
    assert a2.shape == (P * G, T) and torch.equal(a2.reshape(P, G, T), a3)
    # pairwise-judge rewards: an all-tie group is 0, sign from verifier scores instead
    judged = torch.tensor([[0.0] * 4, [0.0] * 4, [-1.0, 1.0, 1.0, -1.0]], dtype=F64)
    a_s = rl_zvp_token_advantages(judged, H, mask, flat_sign=torch.tensor([1, -1, 0]))
    assert torch.allclose(a_s[:2], a3[:2])
    a_0 = rl_zvp_token_advantages(judged, H, mask, flat_sign=torch.tensor([0, 0, 0]))
    assert torch.equal(a_0[:2], torch.zeros(2, G, T, dtype=F64))


def test_rl_zvp_entropy_detached():
    H = torch.rand(2, 2, 3, requires_grad=True)
    A = rl_zvp_token_advantages(torch.ones(2, 2), H, torch.ones(2, 2, 3),
                                reward_max=1.0, reward_min=0.0)
    assert not A.requires_grad


def test_rl_zvp_all_masked_response():
    H = torch.rand(1, 2, 3, dtype=F64)
    mask = torch.tensor([[[0, 0, 0], [1, 1, 0]]])
    A = rl_zvp_token_advantages(torch.zeros(1, 2, dtype=F64), H, mask,
                                reward_max=1.0, reward_min=0.0)
    assert torch.equal(A[0, 0], torch.zeros(3, dtype=F64)) and A[0, 1, 2] == 0


# --------------------------------------------------------------------------- properties

_reward = st.sampled_from([0.0, 1.0, 0.5, -1.0]) | st.floats(-3, 3, allow_nan=False)


@st.composite
def _batches(draw):
    P = draw(st.integers(1, 5))
    G = draw(st.integers(1, 6))
    T = draw(st.integers(1, 7))
    flat_rows = draw(st.lists(st.sampled_from([None, 0.0, 1.0, 0.5]), min_size=P, max_size=P))
    rows = []
    for f in flat_rows:
        if f is None:
            rows.append(draw(st.lists(_reward, min_size=G, max_size=G)))
        else:
            rows.append([f] * G)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    H = torch.rand(P, G, T, generator=g, dtype=F64) * 3
    mask = torch.rand(P, G, T, generator=g) < 0.7
    return torch.tensor(rows, dtype=F64), H, mask


@settings(max_examples=150, deadline=None)
@given(_batches(), st.floats(0.0, 1.0))
def test_rl_zvp_matches_reference(batch, alpha):
    rewards, H, mask = batch
    got = rl_zvp_token_advantages(rewards, H, mask, alpha_zvp=alpha, reward_max=1.0,
                                  reward_min=0.0)
    want = ref_rl_zvp(rewards, H, mask, alpha, 1.0, 0.0)
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)


@settings(max_examples=150, deadline=None)
@given(_batches())
def test_group_advantages_properties(batch):
    rewards, _, _ = batch
    a = group_advantages(rewards)
    assert torch.allclose(a, ref_group_advantages(rewards), atol=1e-10)
    flat = zero_variance_groups(rewards)
    # zero mean per group; unit population std (up to eps) for groups with variance
    assert torch.allclose(a.mean(dim=1), torch.zeros_like(a[:, 0]), atol=1e-9)
    std = a.std(dim=1, correction=0)
    assert torch.all(std[flat] == 0)
    assert torch.all(std[~flat] <= 1.0 + 1e-9)
    # invariant to a shift and a positive scale of a group's rewards (up to eps)
    b = group_advantages(rewards * 2.0 + 7.0, eps=0.0)
    assert torch.allclose(b[~flat], group_advantages(rewards, eps=0.0)[~flat], atol=1e-8)


@settings(max_examples=100, deadline=None)
@given(_batches(), st.floats(0.01, 1.0))
def test_rl_zvp_signs(batch, alpha):
    rewards, H, mask = batch
    A = rl_zvp_token_advantages(rewards, H, mask, alpha_zvp=alpha, reward_max=1.0,
                                reward_min=0.0)
    flat = zero_variance_groups(rewards)
    assert torch.all(A[~mask] == 0)
    for p in range(rewards.shape[0]):
        r0 = float(rewards[p, 0])
        if flat[p] and abs(r0 - 1.0) <= FLAT_TOL:
            assert torch.all(A[p] >= 0) and torch.all(A[p] <= alpha * H[p].max() + 1e-12)
        elif flat[p] and abs(r0) <= FLAT_TOL:
            assert torch.all(A[p] <= 0)
        elif flat[p]:
            assert torch.all(A[p] == 0)

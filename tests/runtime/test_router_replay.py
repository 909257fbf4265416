"""Router replay (R2 / R3): selection, gate recomputation, Qwen3-MoE hook, vLLM codec."""

from __future__ import annotations

import base64
import copy
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.router_replay import (
    MoEBlock,
    RouterReplay,
    RouterReplayGroup,
    RoutingMismatch,
    RoutingTrace,
    align_routing,
    collect_router_replays,
    compact,
    decode_routed_experts,
    encode_routed_experts,
    patch_qwen3_moe,
    routing_bytes_per_token,
    select_experts,
    storage_dtype,
)

ROUTERS = [
    pytest.param(
        dict(score_function="softmax", expert_bias=False, norm_topk_prob=True), id="softmax"
    ),
    pytest.param(
        dict(score_function="softmax", expert_bias=False, norm_topk_prob=False), id="softmax-raw"
    ),
    pytest.param(
        dict(score_function="sigmoid", expert_bias=True, norm_topk_prob=True), id="sigmoid+bias"
    ),
]


def _block(**router: object) -> MoEBlock:
    torch.manual_seed(0)
    block = MoEBlock(hidden=32, ffn_hidden=48, num_experts=8, top_k=2, **router)  # type: ignore[arg-type]
    if block.expert_bias is not None:
        block.expert_bias.copy_(torch.randn(8) * 0.3)
    return block


def _ids_of(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """The ids the block selects for x under its current mode (via a second call)."""
    flat = x.reshape(-1, block.hidden)
    return block.router_replay.route(
        block.router(flat),
        score_function=block.score_function,
        expert_bias=block.expert_bias,
        norm_topk_prob=block.norm_topk_prob,
    )[1]


# --------------------------------------------------------------------------- MoEBlock


@pytest.mark.parametrize("router", ROUTERS)
def test_replay_keeps_recorded_experts_after_optimizer_steps(router: dict) -> None:
    block = _block(**router)
    x = torch.randn(4, 24, 32)
    group = collect_router_replays(block)
    assert len(group) == 1 and group[0] is block.replay

    with torch.no_grad(), group.recording() as rec:
        y_old = block(x)
    trace = rec.trace
    recorded = trace.layer(0)[0].long()
    assert trace.ids.dtype == torch.uint8 and trace.ids.shape == (96, 1, 2)

    # same weights: replay reproduces the normal forward exactly
    with torch.no_grad(), group.replaying(trace):
        assert torch.equal(block(x), y_old)

    # change the weights: optimizer steps on a loss, then a hard router perturbation
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        with group.replaying(trace):
            loss = block(x).pow(2).mean()
        loss.backward()
        assert block.router.weight.grad is not None
        assert block.router.weight.grad.abs().sum() > 0  # the router still learns
        opt.step()
    with torch.no_grad():
        block.router.weight.add_(torch.randn_like(block.router.weight) * 2.0)

    with group.replaying(trace):
        assert torch.equal(_ids_of(block, x), recorded)
        block.zero_grad()
        block(x).pow(2).mean().backward()
    assert block.router.weight.grad.abs().sum() > 0

    # replay off: the changed router picks other experts
    assert block.replay.mode == "off"
    assert not torch.equal(_ids_of(block, x), recorded)


def test_record_mode_of_a_single_layer_and_mask() -> None:
    block = _block(score_function="softmax", expert_bias=False, norm_topk_prob=True)
    x = torch.randn(10, 32)
    with block.replay.recording():
        block(x)
    ids = block.replay.get_recorded_indices()
    assert ids is not None and ids.shape == (10, 2)
    with torch.no_grad():
        block.router.weight.mul_(-1.0)  # reverses the preference order
    live = _ids_of(block, x)
    mask = torch.tensor([True] * 5 + [False] * 5)
    with block.replay.replaying(ids, mask):
        got = _ids_of(block, x)
    assert torch.equal(got[:5], ids[:5])
    assert torch.equal(got[5:], live[5:])


def test_replay_token_count_mismatch() -> None:
    block = _block(score_function="softmax", expert_bias=False, norm_topk_prob=True)
    with (
        block.replay.replaying(torch.zeros(7, 2, dtype=torch.long)),
        pytest.raises(RoutingMismatch),
    ):
        block(torch.randn(8, 32))
    block.replay.mode = "replay"
    with pytest.raises(RuntimeError, match="no target ids"):
        block(torch.randn(8, 32))
    with pytest.raises(ValueError):
        block.replay.mode = "bogus"  # type: ignore[assignment]


# --------------------------------------------------------------------------- gates


def test_softmax_gate_formula_by_hand() -> None:
    s = torch.tensor([[0.3, -1.2, 2.0, 0.7, -0.1]], requires_grad=True)
    sel = torch.tensor([[3, 1]])
    g, ids = select_experts(s, 2, replay_ids=sel)
    assert ids.tolist() == [[3, 1]]
    e3, e1 = math.exp(0.7), math.exp(-1.2)
    torch.testing.assert_close(g, torch.tensor([[e3 / (e3 + e1), e1 / (e3 + e1)]]))
    # not normalised: the full-softmax probabilities at the selected ids
    z = sum(math.exp(v) for v in [0.3, -1.2, 2.0, 0.7, -0.1])
    g_raw, _ = select_experts(s, 2, replay_ids=sel, norm_topk_prob=False)
    torch.testing.assert_close(g_raw, torch.tensor([[e3 / z, e1 / z]]))
    # gradient to the logits of the selected experts: dg_3/ds_3 = g3(1-g3), dg_3/ds_1 = -g3 g1
    g[0, 0].backward()
    g3, g1 = e3 / (e3 + e1), e1 / (e3 + e1)
    torch.testing.assert_close(
        s.grad, torch.tensor([[0.0, -g3 * g1, 0.0, g3 * (1 - g3), 0.0]]), rtol=1e-5, atol=1e-7
    )
    # normal selection: top-2 of the softmax
    g_n, ids_n = select_experts(s.detach(), 2)
    assert ids_n.tolist() == [[2, 3]]
    e2 = math.exp(2.0)
    torch.testing.assert_close(g_n, torch.tensor([[e2 / (e2 + e3), e3 / (e2 + e3)]]))


@settings(max_examples=40, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=6, max_size=6).map(
        lambda v: torch.tensor([v])
    ),
    sel=st.permutations(range(6)).map(lambda p: torch.tensor([p[:3]])),
    score_function=st.sampled_from(["softmax", "sigmoid"]),
)
def test_replay_gates_property(
    logits: torch.Tensor, sel: torch.Tensor, score_function: str
) -> None:
    g, ids = select_experts(logits, 3, score_function=score_function, replay_ids=sel)  # type: ignore[arg-type]
    assert torch.equal(ids, sel)
    picked = logits.gather(1, sel).double()
    if score_function == "softmax":
        expected = torch.softmax(picked, dim=-1)
    else:
        expected = torch.sigmoid(picked) / (torch.sigmoid(picked).sum() + 1e-20)
    torch.testing.assert_close(g.double(), expected, rtol=1e-5, atol=1e-6)
    # replaying the normal selection gives the normal gates bitwise
    g_n, ids_n = select_experts(logits, 3, score_function=score_function)  # type: ignore[arg-type]
    g_r, _ = select_experts(logits, 3, score_function=score_function, replay_ids=ids_n)  # type: ignore[arg-type]
    assert torch.equal(g_n, g_r)


def test_softmax_gate_underflow_is_stable() -> None:
    s = torch.tensor([[200.0, 0.0, 1.0, -3.0]], requires_grad=True)
    g, _ = select_experts(s, 2, replay_ids=torch.tensor([[1, 2]]))
    e0, e1 = 1.0, math.exp(1.0)
    torch.testing.assert_close(g, torch.tensor([[e0 / (e0 + e1), e1 / (e0 + e1)]]))
    g.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_sigmoid_gate_formula_by_hand() -> None:
    s = torch.tensor([[0.5, -0.4, 1.5, 0.1]])
    bias = torch.tensor([0.0, 3.0, 0.0, 0.0])
    sig = [1 / (1 + math.exp(-v)) for v in s[0].tolist()]
    # the bias decides the choice (expert 1 wins) but not the weights
    g, ids = select_experts(s, 2, score_function="sigmoid", expert_bias=bias)
    assert ids.tolist() == [[1, 2]]
    d = sig[1] + sig[2]
    torch.testing.assert_close(g, torch.tensor([[sig[1] / d, sig[2] / d]]))
    g_r, ids_r = select_experts(s, 2, score_function="sigmoid", replay_ids=torch.tensor([[3, 0]]))
    assert ids_r.tolist() == [[3, 0]]
    d = sig[3] + sig[0]
    torch.testing.assert_close(g_r, torch.tensor([[sig[3] / d, sig[0] / d]]))
    g_raw, _ = select_experts(
        s, 2, score_function="sigmoid", replay_ids=torch.tensor([[3, 0]]), norm_topk_prob=False
    )
    torch.testing.assert_close(g_raw, torch.tensor([[sig[3], sig[0]]]))


def test_select_experts_argument_errors() -> None:
    s = torch.randn(3, 4)
    with pytest.raises(ValueError):
        select_experts(s, 5)
    with pytest.raises(ValueError):
        select_experts(s, 2, score_function="relu")  # type: ignore[arg-type]
    with pytest.raises(RoutingMismatch):
        select_experts(s, 2, replay_ids=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(RoutingMismatch):
        RouterReplay(4, 2).set_target_indices(torch.tensor([[0, 4]]))
    with pytest.raises(RoutingMismatch):
        RouterReplay(4, 2).set_target_indices(torch.tensor([[0.0, 1.0]]))


# --------------------------------------------------------------------------- Qwen3-MoE


def _tiny_qwen3(norm_topk_prob: bool):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=norm_topk_prob,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg)


def _router_ids(model) -> tuple[list[torch.Tensor], list]:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    seen: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out[2].clone()))
        for m in model.modules()
        if isinstance(m, Qwen3MoeTopKRouter)
    ]
    return seen, handles


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_record_and_replay(norm_topk_prob: bool) -> None:
    model = _tiny_qwen3(norm_topk_prob)
    input_ids = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        reference = model(input_ids).logits
    group = patch_qwen3_moe(model)
    assert isinstance(group, list) and len(group) == 2
    assert patch_qwen3_moe(model) == group  # idempotent
    assert [r.layer for r in group] == [0, 1]

    with torch.no_grad(), group.recording() as rec:
        recorded_logits = model(input_ids).logits
    assert torch.equal(recorded_logits, reference)
    trace = rec.trace
    assert trace.ids.shape == (60, 2, 2)

    # unchanged weights: replaying the recorded ids is bitwise the normal forward
    with torch.no_grad(), group.replaying(trace):
        assert torch.equal(model(input_ids).logits, reference)

    # change the router weights: replay keeps the ids, off does not; the router learns
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(torch.randn_like(p) * 0.5)
    seen, handles = _router_ids(model)
    with group.replaying(trace):
        loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    for layer, ids in enumerate(seen):
        assert torch.equal(ids, trace.layer(layer)[0].long())
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0
    seen.clear()
    with torch.no_grad():
        model(input_ids)
    assert any(not torch.equal(ids, trace.layer(i)[0].long()) for i, ids in enumerate(seen))
    for h in handles:
        h.remove()

    # a deepcopy carries its own, rebound replay state
    clone = copy.deepcopy(model)
    clone_group = collect_router_replays(clone)
    assert len(clone_group) == 2 and clone_group[0] is not group[0]
    with torch.no_grad(), clone_group.replaying(trace):
        clone(input_ids)


def test_qwen3_moe_r3_from_engine_ids() -> None:
    """R3 path: engine ids for prompt+response → aligned, stacked trace → replayed forward."""
    model = _tiny_qwen3(True)
    group = patch_qwen3_moe(model)
    lengths = [(5, 7), (4, 3)]
    rng = np.random.default_rng(0)
    traces, engine = [], []
    for p, r in lengths:
        rows = rng.choice(8, size=(p + r - 1, 2, 2), replace=True)
        rows[..., 1] = (rows[..., 0] + 1 + rng.integers(0, 7, size=rows.shape[:2])) % 8
        b64 = encode_routed_experts(rows.astype(np.int32))
        engine.append(rows)
        traces.append(
            align_routing(
                decode_routed_experts(b64),
                prompt_len=p,
                response_len=r,
                num_experts=8,
                moe_layers=2,
                top_k=2,
            )
        )
    batch = RoutingTrace.stack(traces)
    assert batch.ids.shape == (2, 12, 2, 2) and batch.mask is not None
    assert batch.mask.sum().item() == 11 + 6
    input_ids = torch.randint(0, 128, (2, 12))
    seen, handles = _router_ids(model)
    with torch.no_grad(), group.replaying(batch):
        model(input_ids)
    for h in handles:
        h.remove()
    for layer, ids in enumerate(seen):
        ids = ids.reshape(2, 12, 2)
        for b, (p, r) in enumerate(lengths):
            assert np.array_equal(ids[b, : p + r - 1].numpy(), engine[b][:, layer])


def test_group_replay_mismatches() -> None:
    group = RouterReplayGroup([RouterReplay(8, 2, layer=0), RouterReplay(8, 2, layer=1)])
    good = torch.zeros(5, 2, 2, dtype=torch.uint8)
    good[..., 1] = 1
    for bad in [
        RoutingTrace(good[:, :1], 8),  # layer count
        RoutingTrace(torch.zeros(5, 2, 3, dtype=torch.uint8), 8),  # top_k
        RoutingTrace(good, 16),  # expert count
        RoutingTrace(good + 7, 8),  # id ≥ num_experts
    ]:
        with pytest.raises(RoutingMismatch), group.replaying(bad):
            pass
    with pytest.raises(RoutingMismatch), group.replaying([good[:, 0]]):
        pass
    with pytest.raises(RoutingMismatch):
        RoutingTrace(good, 8, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(RoutingMismatch):
        RoutingTrace(torch.zeros(5, 2, dtype=torch.uint8), 8)
    assert all(r.mode == "off" for r in group)


# --------------------------------------------------------------------------- vLLM codec


def _npy(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_encode_decode_round_trip(dtype: type) -> None:
    # 4 distinct experts of 200 per token and layer, as a top-4 routing is
    arr = np.random.default_rng(1).random((9, 3, 200)).argsort(-1)[..., :4].astype(dtype)
    out = decode_routed_experts(encode_routed_experts(arr))
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, arr)
    # what the server's bytes look like: np.save + base64
    assert np.array_equal(decode_routed_experts(_npy(arr)), arr)


def test_an_all_zero_routing_is_refused() -> None:
    # vLLM without --enforce-eager answers with zeros: replaying them would send every token to
    # expert 0 silently.
    with pytest.raises(RoutingMismatch, match="--enforce-eager"):
        decode_routed_experts(_npy(np.zeros((5, 2, 2), dtype=np.uint8)))
    rows = np.array([[[3, 1]], [[2, 2]], [[0, 5]]], dtype=np.uint8)
    with pytest.raises(RoutingMismatch, match=r"at 1 of 3 rows \(first: row 1\)"):
        decode_routed_experts(_npy(rows))
    top1 = np.zeros((4, 2, 1), dtype=np.uint8)  # top-1: zeros are a routing (expert 0)
    assert np.array_equal(decode_routed_experts(_npy(top1)), top1)


def test_encode_with_num_experts_and_empty() -> None:
    arr = np.array([[[1, 300]]], dtype=np.int64)
    assert decode_routed_experts(encode_routed_experts(arr, num_experts=512)).dtype == np.uint16
    assert (
        decode_routed_experts(encode_routed_experts(arr % 256, num_experts=256)).dtype == np.uint8
    )
    empty = np.zeros((0, 2, 2), dtype=np.uint8)
    assert decode_routed_experts(encode_routed_experts(empty)).shape == (0, 2, 2)
    with pytest.raises(RoutingMismatch):
        encode_routed_experts(arr, num_experts=256)
    with pytest.raises(RoutingMismatch):
        decode_routed_experts("not base64!!")
    truncated = base64.b64decode(encode_routed_experts(arr))[:40]
    with pytest.raises(RoutingMismatch):
        decode_routed_experts(base64.b64encode(truncated))
    with pytest.raises(RoutingMismatch):  # a .npy of the wrong rank
        decode_routed_experts(_npy(np.zeros(3, dtype=np.int32)))
    with pytest.raises(RoutingMismatch):  # a .npy of floats
        decode_routed_experts(_npy(np.zeros((1, 2, 2))))
    with pytest.raises(RoutingMismatch):
        encode_routed_experts(np.zeros((3, 2)))


def test_storage_dtype_compact_bytes() -> None:
    assert storage_dtype(8) == np.uint8 and storage_dtype(256) == np.uint8
    assert storage_dtype(257) == np.int16 and storage_dtype(32768) == np.int16
    with pytest.raises(ValueError):
        storage_dtype(40000)
    assert compact(np.array([[[3, 255]]], dtype=np.int32), 256).dtype == np.uint8
    assert compact(np.array([[[3, 300]]], dtype=np.uint16), 384).dtype == np.int16
    with pytest.raises(RoutingMismatch):
        compact(np.array([[[3, 256]]]), 256)
    with pytest.raises(RoutingMismatch):
        compact(np.array([[[-1, 2]]]), 256)
    assert routing_bytes_per_token(48, 8, 128) == 384  # Qwen3-30B-A3B
    assert routing_bytes_per_token(58, 8, 256) == 464  # DeepSeek-V3
    assert routing_bytes_per_token(2, 4, 512) == 16


def test_align_routing_positions_and_last_token() -> None:
    p, r, layers, k = 4, 3, 2, 2
    rows = np.arange((p + r - 1) * layers * k, dtype=np.int32).reshape(p + r - 1, layers, k) % 16
    t = align_routing(rows, prompt_len=p, response_len=r, num_experts=16, moe_layers=2, top_k=2)
    assert t.ids.shape == (7, 2, 2) and t.ids.dtype == torch.uint8
    assert np.array_equal(t.ids[:6].numpy(), rows)  # position q ← row q
    assert t.mask.tolist() == [True] * 6 + [False]  # last token: live routing
    assert t.ids[6].tolist() == [[0, 1], [0, 1]]  # filler


def test_align_routing_prompt_start_and_prefix() -> None:
    p, r, start = 6, 2, 2
    full = np.random.default_rng(3).integers(0, 8, size=(p + r - 1, 1, 2)).astype(np.uint16)
    t = align_routing(full[start:], prompt_len=p, response_len=r, prompt_start=start, num_experts=8)
    assert t.mask.tolist() == [False, False, True, True, True, True, True, False]
    for pos in range(start, p + r - 1):  # position pos ← row pos − prompt_start
        assert np.array_equal(t.ids[pos].numpy(), full[start:][pos - start])
    t2 = align_routing(
        full[start:],
        prompt_len=p,
        response_len=r,
        prompt_start=start,
        num_experts=8,
        prefix=full[:start],
    )
    assert t2.mask.tolist() == [True] * 7 + [False]
    assert np.array_equal(t2.ids[:7].numpy(), full)


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((6, 2), {}, "shape"),  # not 3-D
        ((5, 2, 2), {}, "rows"),  # one row short
        ((7, 2, 2), {}, "rows"),  # one row too many (the last token has no routing)
        ((6, 3, 2), {"moe_layers": 2}, "MoE layers"),
        ((6, 2, 4), {"top_k": 2}, "top_k"),
        ((6, 2, 2), {"prompt_start": 4}, "prompt_start"),
        ((6, 2, 2), {"prompt_start": -1}, "prompt_start"),
        ((6, 2, 2), {"prefix": np.zeros((1, 2, 2), np.uint8)}, "prefix"),
    ],
)
def test_align_routing_mismatches(shape: tuple, kwargs: dict, match: str) -> None:
    routed = np.zeros(shape, dtype=np.int32)
    args = dict(prompt_len=4, response_len=3, num_experts=8)
    args.update(kwargs)
    with pytest.raises(RoutingMismatch, match=match):
        align_routing(routed, **args)  # type: ignore[arg-type]


def test_align_routing_expert_id_out_of_range() -> None:
    routed = np.zeros((6, 2, 2), dtype=np.int32)
    routed[3, 1, 0] = 8
    with pytest.raises(RoutingMismatch, match=r"\[0, 8\)"):
        align_routing(routed, prompt_len=4, response_len=3, num_experts=8)
    routed[3, 1, 0] = -2
    with pytest.raises(RoutingMismatch):
        align_routing(routed, prompt_len=4, response_len=3, num_experts=8)
    assert issubclass(RoutingMismatch, ValueError)


def test_stack_pads_and_checks() -> None:
    a = align_routing(np.ones((4, 2, 2), np.uint8), prompt_len=2, response_len=3, num_experts=8)
    b = align_routing(np.ones((2, 2, 2), np.uint8), prompt_len=2, response_len=1, num_experts=8)
    right = RoutingTrace.stack([a, b], length=6)
    assert right.ids.shape == (2, 6, 2, 2)
    assert right.mask.tolist() == [[True] * 4 + [False] * 2, [True] * 2 + [False] * 4]
    left = RoutingTrace.stack([a, b], pad_side="left")
    assert left.mask.tolist() == [[True] * 4 + [False], [False] * 2 + [True] * 2 + [False]]
    with pytest.raises(RoutingMismatch):
        RoutingTrace.stack([a, b], length=3)
    c = align_routing(np.ones((2, 1, 2), np.uint8), prompt_len=2, response_len=1, num_experts=8)
    with pytest.raises(RoutingMismatch):
        RoutingTrace.stack([a, c])

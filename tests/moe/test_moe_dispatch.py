"""Dispatch / combine: the plan, the round trip with identity experts, empty experts."""
from __future__ import annotations

import torch

from expertpar.config import MoEConfig
from expertpar.moe.dispatch import combine, dispatch, make_plan
from expertpar.moe.experts import LocalExperts
from expertpar.moe.router import TEXT, Routing, route


def routing_of(expert_TK, keep_TK, weight_TK=None, num_experts=3) -> Routing:
    expert_TK = torch.tensor(expert_TK)
    keep_TK = torch.tensor(keep_TK)
    T = expert_TK.shape[0]
    if weight_TK is None:
        weight_TK = keep_TK.float()
    else:
        weight_TK = torch.tensor(weight_TK) * keep_TK
    probs = torch.full((T, num_experts), 1.0 / num_experts)
    return Routing(probs.log(), probs, expert_TK, weight_TK, keep_TK, None)


def test_plan_by_hand():
    # T = 4, K = 2; flat slot s = t * K + k:
    #   s0 (t0, e2)  s1 (t0, e0)  s2 (t1, e0)  s3 (t1, e1)
    #   s4 (t2, e2)  s5 (t2, e1) DROPPED       s6 (t3, e0)  s7 (t3, e2)
    # kept, grouped by expert with token order kept inside each expert:
    #   e0: s1, s2, s6   e1: s3   e2: s0, s4, s7
    r = routing_of([[2, 0], [0, 1], [2, 1], [0, 2]],
                   [[True, True], [True, True], [True, False], [True, True]])
    plan = make_plan(r)
    assert plan.slot_A.tolist() == [1, 2, 6, 3, 0, 4, 7]
    assert plan.token_A.tolist() == [0, 1, 3, 1, 0, 2, 3]
    assert plan.counts_E == (3, 1, 3)
    assert plan.num_tokens == 4
    assert sum(plan.counts_E) == int(r.keep_TK.sum())


def test_plan_split_gives_each_expert_its_rows():
    r = routing_of([[2, 0], [0, 1], [2, 1], [0, 2]],
                   [[True, True], [True, True], [True, False], [True, True]])
    plan = make_plan(r)
    x = torch.arange(4.0)[:, None] * torch.ones(1, 2)  # row t is [t, t]
    parts = plan.split(dispatch(x, plan))
    assert [p[:, 0].tolist() for p in parts] == [[0.0, 1.0, 3.0], [1.0], [0.0, 2.0, 3.0]]


def test_top1_round_trip_identity_experts_weight_one():
    # T = 5, K = 1; token 2 and 4 dropped.
    r = routing_of([[1], [0], [1], [2], [0]], [[True], [True], [False], [True], [False]])
    plan = make_plan(r)
    assert plan.counts_E == (1, 1, 1)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y = combine(dispatch(x, plan), r.weight_TK, plan)  # identity experts: y_AD = x_AD
    keep = r.keep_TK.squeeze(1)
    torch.testing.assert_close(y[keep], x[keep], rtol=0, atol=0)
    assert torch.equal(y[~keep], torch.zeros(2, 3))


def test_top2_round_trip_sums_weighted_choices():
    # T = 3, K = 2, weights 0.5 / 0.5; token 1 loses its second choice -> 0.5 x.
    r = routing_of([[0, 1], [1, 2], [2, 0]], [[True, True], [True, False], [True, True]],
                   weight_TK=[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    plan = make_plan(r)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    y = combine(dispatch(x, plan), r.weight_TK, plan)
    torch.testing.assert_close(y, x * torch.tensor([[1.0], [0.5], [1.0]]))


def test_combine_applies_per_expert_outputs_and_weights():
    # experts that scale by (e + 1): token t's output = sum_k w_tk * (e_tk + 1) * x_t
    r = routing_of([[0, 2], [1, 0]], [[True, True], [True, True]],
                   weight_TK=[[0.7, 0.3], [0.6, 0.4]])
    plan = make_plan(r)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    x_AD = dispatch(x, plan)
    scale = torch.repeat_interleave(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(plan.counts_E))
    y = combine(x_AD * scale[:, None], r.weight_TK, plan)
    # t0: 0.7 * 1 + 0.3 * 3 = 1.6 ; t1: 0.6 * 2 + 0.4 * 1 = 1.6
    torch.testing.assert_close(y, torch.tensor([[1.6, 3.2], [4.8, -1.6]]))


def test_round_trip_through_real_router_with_drops():
    # all tokens choose expert 0 with p = .9 .. .6; capacity 2 keeps tokens 0 and 1.
    x2 = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]).log()
    r = route(x2, torch.eye(2), torch.full((4,), TEXT), MoEConfig(num_experts=2,
              capacity_factor=1.0), training=True)
    plan = make_plan(r)
    assert plan.counts_E == (2, 0)
    assert plan.token_A.tolist() == [0, 1]
    y = combine(dispatch(x2, plan), torch.ones_like(r.weight_TK), plan)
    torch.testing.assert_close(y[:2], x2[:2])
    assert torch.equal(y[2:], torch.zeros(2, 2))


def test_local_experts_with_an_empty_expert():
    torch.manual_seed(0)
    experts = LocalExperts(3, 4, 8)
    # expert 1 gets no rows
    r = routing_of([[0], [2], [0], [2], [2]], [[True]] * 5)
    plan = make_plan(r)
    assert plan.counts_E == (2, 0, 3)
    x = torch.randn(5, 4, requires_grad=True)
    y_AD = experts(dispatch(x, plan), plan.counts_E)
    assert y_AD.shape == (5, 4)
    # rows are grouped by expert: tokens 0, 2 -> expert 0; tokens 1, 3, 4 -> expert 2
    want = torch.cat([experts.experts[0](x[[0, 2]]), experts.experts[2](x[[1, 3, 4]])])
    torch.testing.assert_close(y_AD, want)
    y = combine(y_AD, r.weight_TK, plan)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert experts.experts[0].fc1.weight.grad is not None
    assert experts.experts[2].fc2.weight.grad is not None
    g = experts.experts[1].fc1.weight.grad
    assert g is None or torch.count_nonzero(g) == 0  # the idle expert gets no gradient


def test_local_experts_all_rows_to_one_expert_and_no_rows_at_all():
    torch.manual_seed(0)
    experts = LocalExperts(2, 3, 5)
    x = torch.randn(4, 3)
    torch.testing.assert_close(experts(x, (0, 4)), experts.experts[1](x))
    empty = experts(torch.zeros(0, 3), (0, 0))
    assert empty.shape == (0, 3)


def test_plan_with_no_tokens():
    r = Routing(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 2, dtype=torch.long),
                torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.bool), None)
    plan = make_plan(r)
    assert plan.counts_E == (0, 0, 0)
    y = combine(dispatch(torch.zeros(0, 4), plan), r.weight_TK, plan)
    assert y.shape == (0, 4)

"""Dispatch / combine: the plan, the round trip with identity experts, empty experts."""
from __future__ import annotations

import pytest
import torch

from expertpar.config import MoEConfig
from expertpar.moe.dispatch import combine, dispatch, make_plan
from expertpar.moe.experts import LocalExperts
from expertpar.moe.router import TEXT, Routing, route, token_choice_assignments


def routing_of(expert_TK, keep_TK, weight_TK=None, num_experts=3) -> Routing:
    """A token-choice Routing from hand-written tables (weights default to 1 where kept)."""
    expert_TK = torch.tensor(expert_TK)
    keep_TK = torch.tensor(keep_TK)
    T, K = expert_TK.shape
    weight_TK = keep_TK.float() if weight_TK is None else torch.tensor(weight_TK)
    token_A, expert_A, weight_A = token_choice_assignments(expert_TK, weight_TK, keep_TK)
    probs = torch.full((T, num_experts), 1.0 / num_experts)
    return Routing(policy="token_choice", logits_TE=probs.log(), probs_TE=probs,
                   token_A=token_A, expert_A=expert_A, weight_A=weight_A,
                   token_R=torch.arange(T).repeat_interleave(K), expert_R=expert_TK.reshape(-1),
                   capacity=None)


def test_plan_by_hand():
    # T = 4, K = 2; flat slot s = t * K + k:
    #   s0 (t0, e2)  s1 (t0, e0)  s2 (t1, e0)  s3 (t1, e1)
    #   s4 (t2, e2)  s5 (t2, e1) DROPPED       s6 (t3, e0)  s7 (t3, e2)
    # kept, grouped by expert with token order kept inside each expert:
    #   e0: s1, s2, s6   e1: s3   e2: s0, s4, s7
    # Weight of slot s is s / 10, so the weights must come out in that slot order.
    r = routing_of([[2, 0], [0, 1], [2, 1], [0, 2]],
                   [[True, True], [True, True], [True, False], [True, True]],
                   weight_TK=[[0.0, 0.1], [0.2, 0.3], [0.4, 0.5], [0.6, 0.7]])
    plan = make_plan(r)
    torch.testing.assert_close(r.weight_A, torch.tensor([1, 2, 6, 3, 0, 4, 7]) / 10)
    assert r.expert_A.tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert plan.token_A.tolist() == [0, 1, 3, 1, 0, 2, 3]
    assert plan.counts_E == (3, 1, 3)
    assert plan.num_tokens == 4
    assert sum(plan.counts_E) == 7  # 8 choices, one dropped


def test_plan_refuses_assignments_not_grouped_by_expert():
    probs = torch.full((2, 2), 0.5)
    r = Routing(policy="token_choice", logits_TE=probs.log(), probs_TE=probs,
                token_A=torch.tensor([0, 1]), expert_A=torch.tensor([1, 0]),
                weight_A=torch.ones(2), token_R=torch.tensor([0, 1]),
                expert_R=torch.tensor([1, 0]), capacity=None)
    with pytest.raises(ValueError, match=r"grouped by expert.*\[1, 0\]"):
        make_plan(r)


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
    y = combine(dispatch(x, plan), r.weight_A, plan)  # identity experts: y_AD = x_AD
    keep = torch.tensor([True, True, False, True, False])
    torch.testing.assert_close(y[keep], x[keep], rtol=0, atol=0)
    assert torch.equal(y[~keep], torch.zeros(2, 3))


def test_top2_round_trip_sums_weighted_choices():
    # T = 3, K = 2, weights 0.5 / 0.5; token 1 loses its second choice -> 0.5 x.
    r = routing_of([[0, 1], [1, 2], [2, 0]], [[True, True], [True, False], [True, True]],
                   weight_TK=[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    plan = make_plan(r)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    y = combine(dispatch(x, plan), r.weight_A, plan)
    torch.testing.assert_close(y, x * torch.tensor([[1.0], [0.5], [1.0]]))


def test_combine_applies_per_expert_outputs_and_weights():
    # experts that scale by (e + 1): token t's output = sum_k w_tk * (e_tk + 1) * x_t
    r = routing_of([[0, 2], [1, 0]], [[True, True], [True, True]],
                   weight_TK=[[0.7, 0.3], [0.6, 0.4]])
    plan = make_plan(r)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    x_AD = dispatch(x, plan)
    scale = torch.repeat_interleave(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(plan.counts_E))
    y = combine(x_AD * scale[:, None], r.weight_A, plan)
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
    y = combine(dispatch(x2, plan), torch.ones_like(r.weight_A), plan)
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
    y = combine(y_AD, r.weight_A, plan)
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
    empty = torch.zeros(0, dtype=torch.long)
    r = Routing(policy="token_choice", logits_TE=torch.zeros(0, 3), probs_TE=torch.zeros(0, 3),
                token_A=empty, expert_A=empty, weight_A=torch.zeros(0), token_R=empty,
                expert_R=empty, capacity=None)
    plan = make_plan(r)
    assert plan.counts_E == (0, 0, 0)
    y = combine(dispatch(torch.zeros(0, 4), plan), r.weight_A, plan)
    assert y.shape == (0, 4)

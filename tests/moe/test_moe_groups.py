"""Routing groups (model.moe.routing_groups): each group routed on its own, the auxiliary
losses and statistics over the whole batch; one group routed here and the rest elsewhere
(a router actor's view) gives the same numbers and, summed over groups, the same gradients."""
from __future__ import annotations

import pytest
import torch

from expertpar.config import MoEConfig
from expertpar.moe import MoELayer, RouteContext
from expertpar.moe.layer import GroupRouting, MoEOutput
from expertpar.moe.losses import load_balance_loss


def layer(groups: int, **kw) -> MoELayer:
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, capacity_factor=1.0,
                    noise_std=0.5, local_entropy_weight=0.01, global_entropy_weight=0.01,
                    routing_groups=groups, **kw)
    return MoELayer(8, cfg, 0, seed=3)


def inputs(T=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, 8, generator=gen)
    modality_T = (torch.arange(T) >= T * 2 // 3).long()
    # Image tokens of group 0, then group 1; text tokens of group 0, then group 1: the order
    # of a batch whose first half of samples is group 0 (see tower._group_of_token).
    group_T = torch.cat([torch.arange(16) >= 8, torch.arange(8) >= 4]).long()
    return x_TD, modality_T, group_T


def test_each_group_is_routed_alone_with_its_own_capacity_and_noise():
    x_TD, modality_T, group_T = inputs()
    grouped = layer(2)
    out = grouped(x_TD, modality_T, RouteContext(0, 7), group_T)
    kept = torch.zeros_like(out.stats.kept_ME)
    probs, experts_R = [], []
    for g in range(2):
        idx = torch.nonzero(group_T == g).squeeze(1)
        routing = grouped._route(x_TD[idx], modality_T[idx], RouteContext(0, 7), g)
        y_g = grouped.run_experts(x_TD[idx], routing)
        assert torch.allclose(out.y_TD[idx], y_g, atol=1e-6)
        # 12 tokens, top-2 of 4 experts, capacity factor 1: 6 slots an expert in each group.
        assert routing.capacity == 6
        kept_g = torch.bincount(modality_T[idx][routing.token_A] * 4 + routing.expert_A,
                                minlength=8).reshape(2, 4).float()
        kept += kept_g
        probs.append(routing.probs_TE)
        experts_R.append(routing.expert_R)
    assert torch.equal(out.stats.kept_ME, kept)
    assert float(out.stats.tokens_M.sum()) == 24
    # The load-balancing term is the whole batch's, not a mean of per-group terms.
    want = load_balance_loss(torch.cat(probs), torch.cat(experts_R))
    assert float(out.aux["load_balance"]) == pytest.approx(float(want.detach()), rel=1e-6)
    # Different noise per group: group 1's routing is not group 0's stream continued.
    assert RouteContext(0, 7).noise_seed(0, 1) != RouteContext(0, 7).noise_seed(0, 0)


def test_one_group_at_a_time_gives_the_grouped_layers_output_losses_and_gradients():
    x_TD, modality_T, group_T = inputs(seed=1)
    ref = layer(2)
    xr = x_TD.clone().requires_grad_(True)
    out = ref(xr, modality_T, RouteContext(0, 2), group_T)
    g_TD = torch.randn(24, 8, generator=torch.Generator().manual_seed(9))
    ((out.y_TD * g_TD).sum() + out.aux_loss).backward()

    # Two "routers": each sees only its group's tokens and shares its routing with the other.
    routers = [layer(2) for _ in range(2)]
    idx = [torch.nonzero(group_T == g).squeeze(1) for g in range(2)]
    shared = [routers[g]._route(x_TD[idx[g]], modality_T[idx[g]], RouteContext(0, 2), g)
              for g in range(2)]
    parts = [GroupRouting.of(r, modality_T[i]).detached() for r, i in zip(shared, idx)]
    dx_TD = torch.zeros_like(x_TD)
    gate_grad = torch.zeros_like(ref.gate.w_ED)
    for g, router in enumerate(routers):
        xg = x_TD[idx[g]].clone().requires_grad_(True)
        routed = router.route(xg, modality_T[idx[g]], RouteContext(0, 2), g,
                              share=lambda part: list(parts))
        got = MoEOutput(router.run_experts(xg, routed.routing), *routed[1:])
        assert torch.allclose(got.y_TD, out.y_TD[idx[g]].detach(), atol=1e-6)
        assert float(got.aux_loss) == pytest.approx(float(out.aux_loss), rel=1e-6)
        assert torch.equal(got.stats.kept_ME, out.stats.kept_ME)
        ((got.y_TD * g_TD[idx[g]]).sum() + got.aux_loss).backward()
        dx_TD[idx[g]] = xg.grad
        gate_grad += router.gate.w_ED.grad
    assert torch.allclose(dx_TD, xr.grad, atol=1e-6)
    assert torch.allclose(gate_grad, ref.gate.w_ED.grad, atol=1e-6)
    for e, expert in enumerate(ref.experts.experts):
        summed = sum(r.experts.experts[e].fc1.weight.grad for r in routers)
        assert torch.allclose(summed, expert.fc1.weight.grad, atol=1e-6)


def test_evaluation_routes_the_batch_as_one_group():
    x_TD, modality_T, group_T = inputs(seed=2)
    grouped, single = layer(2).eval(), layer(1).eval()
    with torch.no_grad():
        a = grouped(x_TD, modality_T, RouteContext(0, 0), group_T)
        b = single(x_TD, modality_T, RouteContext(0, 0))
    assert torch.equal(a.y_TD, b.y_TD)


def test_a_group_is_a_run_of_whole_samples():
    from expertpar.model.tower import Seq, _group_of_token
    image = Seq(torch.zeros(4, 3, 2), torch.ones(4, 3, dtype=torch.bool), 0)
    text = Seq(torch.zeros(4, 5, 2), torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0],
                                                  [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool(), 1)
    assert _group_of_token([image, text], 2).tolist() == [0] * 6 + [1] * 6 + [0] * 3 + [1] * 4

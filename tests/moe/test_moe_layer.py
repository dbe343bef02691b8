"""MoELayer end to end: equivalence with a dense FFN, a slow token-by-token reference,
routing statistics by hand, gradients, and empty input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from expertpar.config import MoEConfig
from expertpar.moe.experts import FFN as DenseFFN
from expertpar.moe import IMAGE, TEXT, MoELayer, RouteContext
from expertpar.moe.router import route


def dense_copy(layer: MoELayer, expert: int = 0) -> DenseFFN:
    src = layer.experts.experts[expert]
    ffn = DenseFFN(src.fc1.in_features, src.fc1.out_features)
    with torch.no_grad():
        for a, b in ((ffn.fc1, src.fc1), (ffn.fc2, src.fc2)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    return ffn


def randomise_(layer: MoELayer, seed: int, gate_scale: float = 1.0) -> None:
    """Bigger weights than the 0.02 init, so routing and expert outputs are far from trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.gate.w_ED.copy_(torch.randn(layer.gate.w_ED.shape, generator=gen) * gate_scale)
        for p in layer.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def slow_capacity_keep(expert_TK, score_TK, E, capacity):
    T, K = len(expert_TK), len(expert_TK[0]) if expert_TK else 0
    used, keep = [0] * E, [[False] * K for _ in range(T)]
    for k in range(K):
        for t in sorted(range(T), key=lambda t: (-float(score_TK[t][k]), t)):
            e = int(expert_TK[t][k])
            if used[e] < capacity:
                used[e] += 1
                keep[t][k] = True
    return keep


def slow_reference(layer: MoELayer, x_TD: torch.Tensor, capacity: int | None):
    """Token by token: y_t = sum_k w_tk * expert_{e_tk}(x_t), with the routing recomputed here
    from the gate weights (softmax(alpha * W x_t), top-k best first, renormalised when k > 1,
    probability drop policy with first choices before second choices)."""
    cfg = layer.cfg
    W = layer.gate.w_ED
    T, K = x_TD.shape[0], cfg.top_k
    chosen, weights, scores = [], [], []
    for t in range(T):
        p = torch.softmax(cfg.temperature * (W @ x_TD[t]), dim=0)
        order = sorted(range(cfg.num_experts), key=lambda e: -float(p[e].detach()))[:K]
        w = torch.stack([p[e] for e in order])
        if K > 1 and cfg.renormalize:
            w = w / w.sum()
        chosen.append(order)
        weights.append(w)
        scores.append([float(p[e].detach()) for e in order])
    if capacity is None:
        keep = [[True] * K for _ in range(T)]
    else:
        keep = slow_capacity_keep(chosen, scores, cfg.num_experts, capacity)
    rows = []
    for t in range(T):
        y = torch.zeros_like(x_TD[t])
        for k in range(K):
            if keep[t][k]:
                y = y + weights[t][k] * layer.experts.experts[chosen[t][k]](x_TD[t][None])[0]
        rows.append(y)
    return torch.stack(rows), chosen, keep


# ------------------------------------------------------------------ 1 expert == dense FFN


@pytest.mark.parametrize("dropless,capacity_factor", [(True, 1.25), (False, 2.0),
                                                      (False, 1.0)])
def test_one_expert_top1_equals_dense_ffn(dropless, capacity_factor):
    torch.manual_seed(0)
    D, F_ = 8, 16
    cfg = MoEConfig(num_experts=1, top_k=1, every=1, expert_hidden=F_, dropless=dropless,
                    capacity_factor=capacity_factor, load_balance_weight=0.0,
                    z_loss_weight=0.0)
    layer = MoELayer(D, cfg, 0)
    randomise_(layer, 1)
    dense = dense_copy(layer)
    x = torch.randn(7, D)
    mod = torch.tensor([IMAGE] * 4 + [TEXT] * 3)
    x_moe = x.clone().requires_grad_(True)
    x_dense = x.clone().requires_grad_(True)
    out = layer(x_moe, mod)
    y_dense = dense(x_dense)
    torch.testing.assert_close(out.y_TD, y_dense)
    # capacity = ceil(factor * 7 / 1) >= 7: nothing dropped
    assert out.stats.kept_ME.sum().item() == 7
    # same upstream gradient through both
    g = torch.randn(7, D, generator=torch.Generator().manual_seed(2))
    (out.y_TD * g).sum().backward()
    (y_dense * g).sum().backward()
    torch.testing.assert_close(x_moe.grad, x_dense.grad)
    e = layer.experts.experts[0]
    for mine, ref in ((e.fc1.weight, dense.fc1.weight), (e.fc1.bias, dense.fc1.bias),
                      (e.fc2.weight, dense.fc2.weight), (e.fc2.bias, dense.fc2.bias)):
        torch.testing.assert_close(mine.grad, ref.grad)
    # a single expert's gate probability is constantly 1: its gradient is 0
    assert layer.gate.w_ED.grad is None or torch.count_nonzero(layer.gate.w_ED.grad) == 0
    assert out.aux_loss.item() == 0.0


# ------------------------------------------------------------------ slow reference


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_top2_dropless_matches_slow_reference(temperature):
    torch.manual_seed(0)
    D = 6
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=10, dropless=True,
                    temperature=temperature)
    layer = MoELayer(D, cfg, 3, seed=5)
    randomise_(layer, 7)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(8))
    mod = torch.tensor([IMAGE] * 5 + [TEXT] * 4)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out = layer(x1, mod)
    ref, chosen, _ = slow_reference(layer, x2, None)
    torch.testing.assert_close(out.y_TD, ref)
    # a non-trivial case: more than two experts in use
    assert len({e for c in chosen for e in c}) > 2
    g = torch.randn(9, D, generator=torch.Generator().manual_seed(9))
    (out.y_TD * g).sum().backward()
    gate_grad = layer.gate.w_ED.grad.clone()
    layer.zero_grad()
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(gate_grad, layer.gate.w_ED.grad)


@pytest.mark.parametrize("top_k,factor", [(1, 0.75), (2, 0.5), (2, 1.0)])
def test_with_capacity_matches_slow_reference(top_k, factor):
    D, T, E = 5, 12, 3
    cfg = MoEConfig(num_experts=E, top_k=top_k, expert_hidden=7, capacity_factor=factor,
                    load_balance_weight=0.0, z_loss_weight=0.0)
    layer = MoELayer(D, cfg, 1)
    randomise_(layer, 11, gate_scale=2.0)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(12))
    mod = torch.full((T,), TEXT)
    out = layer(x, mod)
    capacity = max(1, math.ceil(factor * T * top_k / E))
    ref, _, keep = slow_reference(layer, x, capacity)
    torch.testing.assert_close(out.y_TD, ref)
    n_dropped = sum(not k for row in keep for k in row)
    assert n_dropped > 0  # the case actually exercises dropping
    assert out.stats.kept_ME.sum().item() == T * top_k - n_dropped


# ------------------------------------------------------------------ routing statistics


def _stats_layer():
    # dim = E = 2, identity gate: logits = x. tokens written as log-probs.
    cfg = MoEConfig(num_experts=2, top_k=1, expert_hidden=4, capacity_factor=1.0)
    layer = MoELayer(2, cfg, 0)
    with torch.no_grad():
        layer.gate.w_ED.copy_(torch.eye(2))
    x = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]]).log()
    mod = torch.tensor([IMAGE, IMAGE, TEXT, TEXT])
    return layer, x, mod


def test_routing_stats_by_hand():
    # t0 img p .9 -> e0; t1 img .7 -> e0; t2 txt .6 -> e0; t3 txt .8 -> e1
    # capacity = ceil(1.0 * 4 * 1 / 2) = 2; e0 wanted by .9, .7, .6 -> drop t2 (text)
    layer, x, mod = _stats_layer()
    out = layer(x, mod)
    s = out.stats
    assert s.routed_ME.tolist() == [[2.0, 0.0], [1.0, 1.0]]  # rows: image, text
    assert s.kept_ME.tolist() == [[2.0, 0.0], [0.0, 1.0]]
    assert s.tokens_M.tolist() == [2.0, 2.0]
    # entropies: H(.9,.1) = 0.325083, H(.7,.3) = 0.610864, H(.6,.4) = 0.673012,
    # H(.2,.8) = 0.500402 -> image 0.935947, text 1.173414 (sums)
    torch.testing.assert_close(s.entropy_sum_M, torch.tensor([0.935947, 1.173414]),
                               rtol=1e-5, atol=1e-5)
    m = s.summary("moe0")
    assert m["moe0/drop_rate"] == pytest.approx(0.25)  # 1 - 3/4
    assert m["moe0/image/drop_rate"] == pytest.approx(0.0)
    assert m["moe0/text/drop_rate"] == pytest.approx(0.5)
    assert m["moe0/image/tokens_expert0"] == 2 and m["moe0/image/tokens_expert1"] == 0
    assert m["moe0/text/tokens_expert0"] == 0 and m["moe0/text/tokens_expert1"] == 1
    assert m["moe0/router_entropy"] == pytest.approx((0.935947 + 1.173414) / 4, rel=1e-5)
    assert m["moe0/image/router_entropy"] == pytest.approx(0.935947 / 2, rel=1e-5)
    assert m["moe0/text/router_entropy"] == pytest.approx(1.173414 / 2, rel=1e-5)
    # the dropped token's output is exactly zero, the others are not
    assert torch.equal(out.y_TD[2], torch.zeros(2))
    assert (out.y_TD[[0, 1, 3]].abs().sum(1) > 0).all()


def test_routing_stats_match_counts_from_route():
    D, T, E, K = 6, 20, 4, 2
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden=8, capacity_factor=0.6)
    layer = MoELayer(D, cfg, 2)
    randomise_(layer, 3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, D, generator=gen)
    mod = torch.randint(0, 2, (T,), generator=gen)
    out = layer(x, mod)
    r = route(x, layer.gate.w_ED, mod, cfg, training=True, noise_seed=0)
    routed = [[0] * E for _ in range(2)]
    kept = [[0] * E for _ in range(2)]
    for t, e in zip(r.token_R.tolist(), r.expert_R.tolist()):
        routed[int(mod[t])][e] += 1
    for t, e in zip(r.token_A.tolist(), r.expert_A.tolist()):
        kept[int(mod[t])][e] += 1
    assert len(r.token_R) == T * K
    assert out.stats.routed_ME.tolist() == routed
    assert out.stats.kept_ME.tolist() == kept
    n_kept = sum(map(sum, kept))
    assert n_kept < T * K
    assert out.stats.summary("m")["m/drop_rate"] == pytest.approx(1 - n_kept / (T * K))


def test_routing_stats_add_up():
    layer, x, mod = _stats_layer()
    s1 = layer(x, mod).stats
    s2 = layer(x[:2], mod[:2]).stats
    tot = s1 + s2
    assert tot.routed_ME.tolist() == [[4.0, 0.0], [1.0, 1.0]]
    assert tot.tokens_M.tolist() == [4.0, 2.0]
    torch.testing.assert_close(tot.entropy_sum_M, s1.entropy_sum_M + s2.entropy_sum_M)


def test_eval_mode_uses_eval_capacity_factor():
    layer, x, mod = _stats_layer()  # capacity_factor 1.0 (drops t2), eval factor 2.0
    layer.eval()
    out = layer(x, mod)
    assert out.stats.kept_ME.sum().item() == 4
    assert out.stats.summary("m")["m/drop_rate"] == 0.0


# ------------------------------------------------------------------ gradients, noise, aux


def test_gradients_are_finite_and_reach_gate_and_experts():
    D, T = 8, 16
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=12, capacity_factor=1.0,
                    noise_std=0.5, load_balance_weight=0.01, z_loss_weight=0.001,
                    local_entropy_weight=0.01, global_entropy_weight=0.01)
    layer = MoELayer(D, cfg, 0, seed=3)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(5), requires_grad=True)
    mod = torch.tensor([IMAGE] * 10 + [TEXT] * 6)
    out = layer(x, mod, RouteContext(seed=1, step=7))
    (out.y_TD.square().sum() + out.aux_loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(layer.gate.w_ED.grad).all()
    assert layer.gate.w_ED.grad.abs().sum() > 0
    used = 0
    for e in layer.experts.experts:
        if e.fc1.weight.grad is not None:
            assert torch.isfinite(e.fc1.weight.grad).all()
            used += 1
    assert used >= 2
    # the logged aux terms are detached, the aux loss is not
    assert all(not v.requires_grad for v in out.aux.values())
    assert out.aux_loss.requires_grad


def test_noise_follows_route_context():
    D, T = 4, 10
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden=6, noise_std=1.0, dropless=True)
    layer = MoELayer(D, cfg, 2)
    randomise_(layer, 0, gate_scale=0.1)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    mod = torch.full((T,), IMAGE)
    a = layer(x, mod, RouteContext(seed=0, step=3)).y_TD
    b = layer(x, mod, RouteContext(seed=0, step=3)).y_TD
    c = layer(x, mod, RouteContext(seed=0, step=4)).y_TD
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    layer.eval()  # no noise in eval: the step no longer matters
    assert torch.equal(layer(x, mod, RouteContext(step=3)).y_TD,
                       layer(x, mod, RouteContext(step=4)).y_TD)


def test_layer_init_is_deterministic_per_seed():
    cfg = MoEConfig(num_experts=3, expert_hidden=5)
    a, b, c = MoELayer(4, cfg, 1, seed=2), MoELayer(4, cfg, 1, seed=2), MoELayer(4, cfg, 1, seed=3)
    assert torch.equal(a.gate.w_ED, b.gate.w_ED)
    assert torch.equal(a.experts.experts[2].fc1.weight, b.experts.experts[2].fc1.weight)
    assert not torch.equal(a.gate.w_ED, c.gate.w_ED)
    # experts differ from one another
    assert not torch.equal(a.experts.experts[0].fc1.weight, a.experts.experts[1].fc1.weight)


# ------------------------------------------------------------------ empty input


@pytest.mark.parametrize("routing,dropless", [("token_choice", True), ("token_choice", False),
                                              ("expert_choice", False)])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_layer_with_no_tokens(routing, dropless, top_k, training):
    cfg = MoEConfig(num_experts=3, top_k=top_k, expert_hidden=4, dropless=dropless,
                    routing=routing, local_entropy_weight=0.1, global_entropy_weight=0.1,
                    noise_std=0.1)
    layer = MoELayer(5, cfg, 0)
    layer.train(training)
    x = torch.zeros(0, 5, requires_grad=True)
    out = layer(x, torch.zeros(0, dtype=torch.long))
    assert out.y_TD.shape == (0, 5)
    assert out.aux_loss.item() == 0.0
    (out.y_TD.sum() + out.aux_loss).backward()
    # The output must stay connected to the input even with no tokens: a caller that
    # backpropagates through an empty batch (one worker's share) gets a gradient, not None.
    assert x.grad is not None
    assert x.grad.shape == (0, 5)
    assert out.stats.routed_ME.sum().item() == 0
    m = out.stats.summary("m")
    assert m["m/drop_rate"] == 0.0 and m["m/router_entropy"] == 0.0


def test_dropless_layer_never_drops_even_when_all_tokens_pick_one_expert():
    layer, x, mod = _stats_layer()
    cfg = MoEConfig(num_experts=2, top_k=1, expert_hidden=4, dropless=True)
    dl = MoELayer(2, cfg, 0)
    dl.load_state_dict(layer.state_dict())
    out = dl(x, mod)
    assert out.stats.kept_ME.sum().item() == 4
    ref, _, _ = slow_reference(dl, x, None)
    torch.testing.assert_close(out.y_TD, ref)
    assert F.l1_loss(out.y_TD[2], torch.zeros(2)) > 0


def test_bfloat16_experts_round_their_matmuls_but_route_and_keep_weights_in_float32():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=64, dropless=True)
    fp32 = MoELayer(32, cfg, 0, seed=1)
    bf16 = MoELayer(32, MoEConfig(**{**cfg.__dict__, "expert_precision": "bfloat16"}), 0, seed=1)
    randomise_(fp32, seed=2)
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    modality = (torch.arange(64) >= 40).long()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_a, out_b = fp32(xa, modality), bf16(xb, modality)
    # Routing is float32 in both: the same choices and the same auxiliary loss.
    assert torch.equal(out_a.stats.routed_ME, out_b.stats.routed_ME)
    assert float(out_b.aux_loss.detach()) == float(out_a.aux_loss.detach())
    # The outputs come back in float32, near the float32 layer's but rounded (bf16: 8 bits).
    assert out_b.y_TD.dtype == torch.float32
    y_a, y_b = out_a.y_TD.detach(), out_b.y_TD.detach()
    err = float((y_b - y_a).abs().max() / y_a.abs().max())
    assert 1e-5 < err < 3e-2
    (out_a.y_TD.square().sum()).backward()
    (out_b.y_TD.square().sum()).backward()
    for p in bf16.experts.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    g_err = float((xb.grad - xa.grad).abs().max() / xa.grad.abs().max())
    assert 1e-5 < g_err < 5e-2

"""Expert Choice routing (Zhou et al. 2022): hand-worked choices, weights and layer outputs, a
slow readable reference for forward and gradients, statistics and auxiliary terms, and the
config key reaching the layer.

Shape suffixes as in expertpar/moe/router.py: T tokens, D dim, E experts, C tokens per expert,
A kept (= routed, under expert choice) assignments.

Hand cases use an identity gate (D == E, w_ED = I) and tokens written as log-probabilities,
so softmax(logits) is exactly the probabilities written in the test. Hand-checked layer
outputs use "constant" experts: fc1 = 0 so gelu(fc1 x) = gelu(0) = 0 and expert e returns its
fc2 bias b_e whatever the token; then y_t = sum over experts e that chose t of p[t, e] * b_e.
"""
from __future__ import annotations

import math

import pytest
import torch

from expertpar.config import MoEConfig, config_from_dict
from expertpar.moe import IMAGE, TEXT, LocalBackend, MoELayer, RouteContext
from expertpar.moe.experts import LocalExperts
from expertpar.moe.losses import aux_losses
from expertpar.moe.router import gate_noise, route
from expertpar.moe.stats import RoutingStats

EC = "expert_choice"


def logp(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def H(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def constant_experts_(layer: MoELayer, biases: list[list[float]]) -> None:
    with torch.no_grad():
        layer.gate.w_ED.copy_(torch.eye(layer.gate.w_ED.shape[0]))
        for expert, b in zip(layer.experts.experts, biases):
            expert.fc1.weight.zero_()
            expert.fc1.bias.zero_()
            expert.fc2.weight.normal_()  # multiplies gelu(0) = 0: must not matter
            expert.fc2.bias.copy_(torch.tensor(b))


def assignments(r) -> list[tuple[int, int]]:
    return list(zip(r.token_A.tolist(), r.expert_A.tolist()))


# ------------------------------------------------------------------ hand-worked, E = 2

# T = 4, E = 2.    p(e0)  p(e1)   token choice (top-1) would send
#   t0             .9     .1      e0
#   t1             .6     .4      e0
#   t2             .3     .7      e1
#   t3             .8     .2      e0
# training, capacity_factor 1.0: C = ceil(1.0 * 4 / 2) = 2
#   e0 ranks t0 .9, t3 .8, t1 .6, t2 .3 -> picks t0, t3
#   e1 ranks t2 .7, t1 .4, t3 .2, t0 .1 -> picks t1, t2
#   so t1 goes to e1 (weight .4) although its own best expert is e0.
# eval, eval_capacity_factor 0.5: C = ceil(0.5 * 4 / 2) = 1
#   e0 picks t0; e1 picks t2; t1 and t3 get no expert.
# Constant experts b0 = [1, 0], b1 = [0, 10]:
#   training y = [.9 b0, .4 b1, .7 b1, .8 b0] = [[.9, 0], [0, 4], [0, 7], [.8, 0]]
#   eval     y = [.9 b0, 0, .7 b1, 0]         = [[.9, 0], [0, 0], [0, 7], [0, 0]]
P2 = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]
CFG2 = MoEConfig(num_experts=2, routing=EC, expert_hidden=3, capacity_factor=1.0,
                 eval_capacity_factor=0.5)


def test_hand_worked_two_experts_route():
    x, mod = logp(P2), torch.full((4,), TEXT)
    r = route(x, torch.eye(2), mod, CFG2, training=True)
    assert r.policy == EC and r.capacity == 2
    assert assignments(r) == [(0, 0), (3, 0), (1, 1), (2, 1)]
    torch.testing.assert_close(r.weight_A, torch.tensor([0.9, 0.8, 0.4, 0.7]))
    # nothing is dropped after choosing: routed == kept
    assert torch.equal(r.token_R, r.token_A) and torch.equal(r.expert_R, r.expert_A)
    ev = route(x, torch.eye(2), mod, CFG2, training=False)
    assert ev.capacity == 1
    assert assignments(ev) == [(0, 0), (2, 1)]
    torch.testing.assert_close(ev.weight_A, torch.tensor([0.9, 0.7]))


def test_hand_worked_two_experts_layer_output():
    layer = MoELayer(2, CFG2, 0)
    constant_experts_(layer, [[1.0, 0.0], [0.0, 10.0]])
    x, mod = logp(P2), torch.full((4,), TEXT)
    y = layer(x, mod).y_TD
    torch.testing.assert_close(y, torch.tensor([[0.9, 0.0], [0.0, 4.0], [0.0, 7.0], [0.8, 0.0]]))
    layer.eval()
    y = layer(x, mod).y_TD
    torch.testing.assert_close(y, torch.tensor([[0.9, 0.0], [0.0, 0.0], [0.0, 7.0], [0.0, 0.0]]))


# ------------------------------------------------------------------ hand-worked, E = 3

# T = 4, E = 3, capacity_factor 1.5: C = ceil(1.5 * 4 / 3) = 2.
#          p(e0)  p(e1)  p(e2)   modality
#   t0     .50    .40    .10     image
#   t1     .45    .05    .50     image
#   t2     .05    .55    .40     text
#   t3     .30    .35    .35     text
#   e0 ranks t0 .50, t1 .45 | t3 .30, t2 .05  -> t0, t1
#   e1 ranks t2 .55, t0 .40 | t3 .35, t1 .05  -> t0, t2 (dispatched in token order)
#   e2 ranks t1 .50, t2 .40 | t3 .35, t0 .10  -> t1, t2
# t0, t1, t2 get two experts each; t3 gets none (third everywhere).
# Rows grouped by expert, token order inside: (t0,e0) (t1,e0) (t0,e1) (t2,e1) (t1,e2) (t2,e2)
# with weights .50 .45 .40 .55 .50 .40.
# Constant experts b0 = [1, 0, 0], b1 = [0, 10, 0], b2 = [0, 0, 100]:
#   y0 = .50 b0 + .40 b1 = [.50, 4.0, 0]
#   y1 = .45 b0 + .50 b2 = [.45, 0, 50]
#   y2 = .55 b1 + .40 b2 = [0, 5.5, 40]
#   y3 = 0
P3 = [[0.50, 0.40, 0.10], [0.45, 0.05, 0.50], [0.05, 0.55, 0.40], [0.30, 0.35, 0.35]]
MOD3 = torch.tensor([IMAGE, IMAGE, TEXT, TEXT])


def cfg3(**kw) -> MoEConfig:
    return MoEConfig(num_experts=3, routing=EC, expert_hidden=3, capacity_factor=1.5, **kw)


def test_hand_worked_three_experts_route_gives_tokens_zero_to_two_experts():
    r = route(logp(P3), torch.eye(3), MOD3, cfg3(), training=True)
    assert r.capacity == 2
    assert assignments(r) == [(0, 0), (1, 0), (0, 1), (2, 1), (1, 2), (2, 2)]
    torch.testing.assert_close(r.weight_A, torch.tensor([0.50, 0.45, 0.40, 0.55, 0.50, 0.40]))
    experts_per_token = torch.bincount(r.token_A, minlength=4).tolist()
    assert experts_per_token == [2, 2, 2, 0]


def test_hand_worked_three_experts_layer_output():
    layer = MoELayer(3, cfg3(), 0)
    constant_experts_(layer, [[1.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 100.0]])
    out = layer(logp(P3), MOD3)
    want = torch.tensor([[0.50, 4.0, 0.0], [0.45, 0.0, 50.0], [0.0, 5.5, 40.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out.y_TD, want)
    assert torch.equal(out.y_TD[3], torch.zeros(3))  # the unchosen token: exactly zero


def test_ties_go_to_the_lower_token_index():
    # zero logits: every probability is exactly 1/2, all tokens tie for both experts.
    # C = ceil(1.0 * 4 / 2) = 2: both experts take t0, t1; t2, t3 get nothing.
    r = route(torch.zeros(4, 2), torch.eye(2), torch.full((4,), TEXT),
              MoEConfig(num_experts=2, routing=EC, capacity_factor=1.0), training=True)
    assert assignments(r) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    torch.testing.assert_close(r.weight_A, torch.full((4,), 0.5))
    s = RoutingStats.of(r, torch.full((4,), TEXT)).summary("m")
    assert s["m/drop_rate"] == pytest.approx(0.5)


# ------------------------------------------------------------------ statistics and aux terms


def test_stats_under_expert_choice_by_hand():
    # From the E = 3 case: image t0 (e0, e1), t1 (e0, e2); text t2 (e1, e2), t3 none.
    layer = MoELayer(3, cfg3(), 0)
    constant_experts_(layer, [[1.0, 0.0, 0.0]] * 3)
    s = layer(logp(P3), MOD3).stats
    assert s.policy == EC
    assert s.routed_ME.tolist() == [[2.0, 1.0, 1.0], [0.0, 1.0, 1.0]]  # rows: image, text
    assert s.kept_ME.tolist() == s.routed_ME.tolist()
    assert s.unrouted_M.tolist() == [0.0, 1.0]
    assert s.tokens_M.tolist() == [2.0, 2.0]
    # entropy as under token choice: sum of per-token H(p), per modality
    img = H(0.50, 0.40, 0.10) + H(0.45, 0.05, 0.50)
    txt = H(0.05, 0.55, 0.40) + H(0.30, 0.35, 0.35)
    torch.testing.assert_close(s.entropy_sum_M, torch.tensor([img, txt]), rtol=1e-5, atol=1e-5)
    m = s.summary("moe0")
    # drop rate = share of tokens no expert chose: t3 of 4 tokens; text 1 of 2; image 0 of 2.
    # (1 - kept / routed would say 0 here: the token-choice meaning does not apply.)
    assert m["moe0/drop_rate"] == pytest.approx(0.25)
    assert m["moe0/image/drop_rate"] == 0.0
    assert m["moe0/text/drop_rate"] == pytest.approx(0.5)
    assert [m[f"moe0/image/tokens_expert{e}"] for e in range(3)] == [2.0, 1.0, 1.0]
    assert [m[f"moe0/text/tokens_expert{e}"] for e in range(3)] == [0.0, 1.0, 1.0]
    assert m["moe0/router_entropy"] == pytest.approx((img + txt) / 4, rel=1e-5)
    # adding two steps adds the token counts, and the rate stays a share of tokens
    m2 = (s + s).summary("moe0")
    assert m2["moe0/drop_rate"] == pytest.approx(0.25)


def test_stats_of_different_policies_do_not_add():
    ec = MoELayer(3, cfg3(), 0)(logp(P3), MOD3).stats
    tc = MoELayer(3, MoEConfig(num_experts=3), 0)(logp(P3), MOD3).stats
    with pytest.raises(ValueError, match="expert_choice.*token_choice"):
        ec + tc


def test_modality_no_expert_chose_reports_drop_rate_one():
    # ties as above: t0, t1 (image) are chosen by both experts, t2, t3 (text) by none.
    layer = MoELayer(2, MoEConfig(num_experts=2, routing=EC, capacity_factor=1.0), 0)
    with torch.no_grad():
        layer.gate.w_ED.zero_()
    m = layer(torch.randn(4, 2), torch.tensor([IMAGE, IMAGE, TEXT, TEXT])).stats.summary("m")
    assert m["m/text/drop_rate"] == 1.0 and m["m/image/drop_rate"] == 0.0
    assert m["m/text/tokens_expert0"] == 0.0 and m["m/text/tokens_expert1"] == 0.0
    assert m["m/drop_rate"] == pytest.approx(0.5)


def test_aux_terms_under_expert_choice_have_no_load_balance():
    # logits = ln p + 1: same probabilities, logsumexp = ln(1) + 1 = 1 for every token, so the
    # z-loss is mean(1^2) = 1.
    x = logp(P3) + 1.0
    lw, gw, zw = 0.1, 0.2, 0.25
    totals = []
    for lbw in (0.0, 7.0):  # the load-balance weight must change nothing
        cfg = cfg3(load_balance_weight=lbw, z_loss_weight=zw, local_entropy_weight=lw,
                   global_entropy_weight=gw)
        r = route(x, torch.eye(3), MOD3, cfg, training=True)
        total, terms = aux_losses(r, MOD3, cfg)
        assert set(terms) == {"z_loss", "local_entropy/image", "local_entropy/text",
                              "global_entropy/image", "global_entropy/text"}
        totals.append(total)
    assert torch.equal(totals[0], totals[1])
    # local image: (H(.50,.40,.10) + H(.45,.05,.50)) / 2; global image: -H(mean) with
    # mean = [.475, .225, .30]; text likewise with mean = [.175, .45, .375]
    li = (H(0.50, 0.40, 0.10) + H(0.45, 0.05, 0.50)) / 2
    lt = (H(0.05, 0.55, 0.40) + H(0.30, 0.35, 0.35)) / 2
    gi, gt = -H(0.475, 0.225, 0.30), -H(0.175, 0.45, 0.375)
    for k, v in {"z_loss": 1.0, "local_entropy/image": li, "local_entropy/text": lt,
                 "global_entropy/image": gi, "global_entropy/text": gt}.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-5), k
    assert totals[0].item() == pytest.approx(zw * 1.0 + lw * (li + lt) + gw * (gi + gt),
                                             rel=1e-5)


def test_layer_aux_loss_and_logged_terms_under_expert_choice():
    cfg = cfg3(load_balance_weight=1.0, z_loss_weight=0.5, local_entropy_weight=0.0,
               global_entropy_weight=0.0)  # z only: the entropy terms are off
    layer = MoELayer(3, cfg, 0)
    constant_experts_(layer, [[1.0, 0.0, 0.0]] * 3)  # identity gate: logits = x
    out = layer(logp(P3) + 1.0, MOD3)
    assert "load_balance" not in out.aux
    assert out.aux["z_loss"].item() == pytest.approx(1.0, rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(0.5, rel=1e-5)  # 0.5 * z only


# ------------------------------------------------------------------ slow reference


def slow_expert_choice(layer: MoELayer, x_TD: torch.Tensor, C: int, noise_TE=None):
    """Readable reference: per token p_t = softmax(alpha * (W x_t + noise_t)); expert e takes
    the C tokens with the largest p_t[e], lower token index first on ties; token t's output is
    the sum over the experts that took it of p_t[e] * expert_e(x_t)."""
    cfg = layer.cfg
    W = layer.gate.w_ED
    T, E = x_TD.shape[0], cfg.num_experts
    probs = []
    for t in range(T):
        logits = W @ x_TD[t]
        if noise_TE is not None:
            logits = logits + cfg.noise_std * noise_TE[t]
        probs.append(torch.softmax(cfg.temperature * logits, dim=0))
    taken_by = [[] for _ in range(T)]  # experts that chose each token
    for e in range(E):
        ranked = sorted(range(T), key=lambda t: (-float(probs[t][e].detach()), t))
        for t in ranked[:C]:
            taken_by[t].append(e)
    rows = []
    for t in range(T):
        y = torch.zeros_like(x_TD[t])
        for e in taken_by[t]:
            y = y + probs[t][e] * layer.experts.experts[e](x_TD[t][None])[0]
        rows.append(y)
    return torch.stack(rows), taken_by


@pytest.mark.parametrize("training,noise_std,temperature,C", [
    (True, 0.0, 1.0, 3),   # capacity_factor 1.0: C = ceil(1.0 * 11 / 4) = ceil(2.75) = 3
    (True, 0.7, 1.5, 3),   # noisy gate (same seeded noise as token choice), sharper softmax
    (False, 0.7, 1.0, 6),  # eval: no noise, eval_capacity_factor 2.0: ceil(5.5) = 6
])
def test_layer_forward_and_gradients_match_slow_reference(training, noise_std, temperature, C):
    D, T, E = 5, 11, 4
    cfg = MoEConfig(num_experts=E, routing=EC, expert_hidden=6, capacity_factor=1.0,
                    eval_capacity_factor=2.0, noise_std=noise_std, temperature=temperature)
    layer = MoELayer(D, cfg, 2, seed=4)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.gate.w_ED.copy_(torch.randn(E, D, generator=gen) * 3.0)  # peaky: experts compete
        for p in layer.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    layer.train(training)
    ctx = RouteContext(seed=3, step=17)
    noise = gate_noise((T, E), ctx.noise_seed(2)) if training and noise_std > 0 else None
    x = torch.randn(T, D, generator=gen)
    mod = torch.tensor([IMAGE] * 6 + [TEXT] * 5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)

    out = layer(x1, mod, ctx)
    ref, taken_by = slow_expert_choice(layer, x2, C, noise)
    torch.testing.assert_close(out.y_TD, ref)
    # Not a degenerate case: with this seed some token gets two or more experts and, when
    # C * E = 12 assignments are spread over 11 tokens, some token gets none.
    counts = [len(es) for es in taken_by]
    assert sum(counts) == C * E and max(counts) >= 2
    if C == 3:
        assert min(counts) == 0

    g = torch.randn(T, D, generator=gen)
    (out.y_TD * g).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    assert x1.grad.abs().sum() > 0
    for n, p in layer.named_parameters():
        # every expert takes C >= 1 tokens, so every expert and the gate get a gradient
        assert got[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], p.grad, msg=n)


# ------------------------------------------------------------------ the config seam


class CountingExperts(LocalExperts):
    """The local backend, recording the rows each expert was sent."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x_AD, counts_E):
        self.calls.append(tuple(counts_E))
        return super().forward(x_AD, counts_E)


def test_config_key_reaches_the_layer():
    # model.moe.routing from a config tree -> LocalBackend -> MoELayer -> expert choice.
    cfg = config_from_dict({"data": {"train": "unused"},
                            "model": {"moe": {"num_experts": 4, "capacity_factor": 1.0}}},
                           ["model.moe.routing=expert_choice"]).model.moe
    assert cfg.routing == EC
    layer = LocalBackend().build_layer(0, 6, cfg, seed=1)
    counting = CountingExperts(4, 6, cfg.expert_hidden)
    counting.load_state_dict(layer.experts.state_dict())
    layer.experts = counting
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    out = layer(x, torch.full((10,), IMAGE))
    # C = ceil(1.0 * 10 / 4) = 3 rows for every expert, whatever the gate says
    assert counting.calls == [(3, 3, 3, 3)]
    assert out.stats.policy == EC
    assert out.stats.kept_ME.sum(0).tolist() == [3.0, 3.0, 3.0, 3.0]
    assert "load_balance" not in out.aux
    # the same weights under (dropless) token choice route each token once: 10 rows, not 12
    tc_layer = MoELayer(6, MoEConfig(num_experts=4, dropless=True), 0, seed=1,
                        experts=counting)
    tc_layer.gate.load_state_dict(layer.gate.state_dict())
    tc_layer(x, torch.full((10,), IMAGE))
    assert len(counting.calls) == 2 and sum(counting.calls[-1]) == 10


def test_token_choice_only_keys_are_ignored():
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(1))
    mod = torch.tensor([IMAGE, TEXT] * 4 + [IMAGE])
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    base = route(x, w, mod, cfg3(), training=True)
    other = route(x, w, mod, cfg3(top_k=2, renormalize=False, drop_policy="position",
                                  batch_prioritized_images=True), training=True)
    for f in ("token_A", "expert_A", "weight_A", "token_R", "expert_R"):
        assert torch.equal(getattr(base, f), getattr(other, f)), f


def test_gate_noise_is_the_token_choice_noise():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(4))
    kw = dict(num_experts=4, noise_std=0.8, temperature=1.3)
    ec = route(x, w, torch.full((6,), TEXT), MoEConfig(routing=EC, **kw), training=True,
               noise_seed=11)
    tc = route(x, w, torch.full((6,), TEXT), MoEConfig(**kw), training=True, noise_seed=11)
    assert torch.equal(ec.logits_TE, tc.logits_TE)
    torch.testing.assert_close(ec.logits_TE, 1.3 * (x @ w.t() + 0.8 * gate_noise((6, 4), 11)))
    with pytest.raises(ValueError, match="noise_seed"):
        route(x, w, torch.full((6,), TEXT), MoEConfig(routing=EC, **kw), training=True)


def test_expert_choice_with_dropless_is_refused():
    cfg = MoEConfig(num_experts=2, routing=EC, dropless=True)
    with pytest.raises(ValueError, match="dropless"):
        route(torch.zeros(3, 2), torch.eye(2), torch.full((3,), TEXT), cfg, training=True)


def test_unknown_routing_is_refused_naming_it():
    cfg = MoEConfig(num_experts=2, routing="hash")  # the dataclass itself does not check
    with pytest.raises(ValueError, match="'hash'.*expert_choice.*token_choice"):
        route(torch.zeros(3, 2), torch.eye(2), torch.full((3,), TEXT), cfg, training=True)


def test_capacity_is_capped_at_the_number_of_tokens():
    # factor 4: ceil(4 * 3 / 2) = 6 > T = 3, so each expert takes all 3 tokens
    r = route(torch.randn(3, 2), torch.eye(2), torch.full((3,), TEXT),
              MoEConfig(num_experts=2, routing=EC, capacity_factor=4.0), training=True)
    assert r.capacity == 3
    assert assignments(r) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]

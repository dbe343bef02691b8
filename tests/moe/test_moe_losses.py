"""Auxiliary router losses against hand-computed values, their minima, and their weighting."""
from __future__ import annotations

import math

import pytest
import torch

from expertpar.config import MoEConfig
from expertpar.moe.losses import (aux_losses, global_entropy_loss, load_balance_loss,
                                  local_entropy_loss, z_loss)
from expertpar.moe.router import IMAGE, TEXT, route

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def H(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


# ------------------------------------------------------------------ load balance


def test_load_balance_by_hand_unbalanced_top1():
    # probs [[.8, .2], [.6, .4]], both tokens -> e0: f = [1, 0], P = [.7, .3]
    # loss = E * sum f*P = 2 * (1 * .7) = 1.4
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    assert load_balance_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(1.4)


def test_load_balance_is_one_at_uniform_probs_and_balanced_assignment():
    # f = [.5, .5], P = [.5, .5] -> 2 * (.25 + .25) = 1
    probs = torch.full((2, 2), 0.5)
    assert load_balance_loss(probs, torch.tensor([[0], [1]])).item() == pytest.approx(1.0)
    # E = 4, T = 8, two tokens per expert, uniform probs -> 1
    probs4 = torch.full((8, 4), 0.25)
    expert = torch.tensor([[0], [1], [2], [3], [3], [2], [1], [0]])
    assert load_balance_loss(probs4, expert).item() == pytest.approx(1.0)


def test_load_balance_larger_when_unbalanced():
    balanced = load_balance_loss(torch.tensor([[0.8, 0.2], [0.2, 0.8]]),
                                 torch.tensor([[0], [1]]))
    # f = [.5, .5], P = [.5, .5] -> 1.0
    assert balanced.item() == pytest.approx(1.0)
    unbalanced = load_balance_loss(torch.tensor([[0.8, 0.2], [0.7, 0.3]]),
                                   torch.tensor([[0], [0]]))
    # f = [1, 0], P = [.75, .25] -> 2 * .75 = 1.5
    assert unbalanced.item() == pytest.approx(1.5)
    assert unbalanced > balanced


def test_load_balance_top2_by_hand():
    # E = 3, K = 2, T = 2; assignments [[0, 1], [0, 2]] -> counts [2, 1, 1] / 4
    # P = mean([.5, .3, .2], [.4, .1, .5]) = [.45, .2, .35]
    # loss = 3 * (.5*.45 + .25*.2 + .25*.35) = 3 * .3625 = 1.0875
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5]])
    got = load_balance_loss(probs, torch.tensor([[0, 1], [0, 2]]))
    assert got.item() == pytest.approx(1.0875)


# ------------------------------------------------------------------ z-loss


def test_z_loss_by_hand():
    # row 0: lse(0, 0) = ln 2; row 1: lse(ln 3, 0) = ln 4
    # mean of squares = ((ln 2)^2 + (ln 4)^2) / 2 = (0.480453 + 1.921812) / 2 = 1.201133
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    assert z_loss(logits).item() == pytest.approx((LN2 ** 2 + LN4 ** 2) / 2, rel=1e-6)
    assert z_loss(logits).item() == pytest.approx(1.201133, rel=1e-5)


@pytest.mark.parametrize("E", [1, 2, 4, 8])
def test_z_loss_of_zero_logits_is_log_e_squared(E):
    # NB: the losses.py module docstring says "z-loss is 0 at zero logits"; that is not
    # what the (correct, ST-MoE) formula gives: logsumexp(0,...,0) = ln E, so z = (ln E)^2.
    assert z_loss(torch.zeros(3, E)).item() == pytest.approx(math.log(E) ** 2, abs=1e-7)


def test_z_loss_zero_when_logsumexp_is_zero():
    # logits = log of a probability vector -> logsumexp = 0 -> z = 0 (its true minimum)
    logits = torch.tensor([[0.25, 0.75], [0.5, 0.5]]).log()
    assert z_loss(logits).item() == pytest.approx(0.0, abs=1e-6)
    assert z_loss(torch.full((2, 4), -LN4)).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ entropies


def test_local_entropy_by_hand():
    # H(.5, .5) = ln 2, H(1, 0) = 0 -> mean ln 2 / 2 = 0.346574
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert local_entropy_loss(probs).item() == pytest.approx(LN2 / 2, rel=1e-6)


def test_local_entropy_extremes():
    assert local_entropy_loss(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-7)
    assert local_entropy_loss(torch.full((3, 4), 0.25)).item() == pytest.approx(LN4, rel=1e-6)


def test_global_entropy_by_hand():
    # decisive tokens on different experts: mean = [.5, .5] -> -ln 2 (the minimum, -ln E)
    assert global_entropy_loss(torch.eye(2)).item() == pytest.approx(-LN2, rel=1e-6)
    # mean([.9, .1], [.7, .3]) = [.8, .2]: H = .8*0.223144 + .2*1.609438 = 0.500402
    got = global_entropy_loss(torch.tensor([[0.9, 0.1], [0.7, 0.3]])).item()
    assert got == pytest.approx(-H(0.8, 0.2), rel=1e-6)
    assert got == pytest.approx(-0.500402, rel=1e-5)
    assert got > -LN2


def test_global_entropy_minimum_is_minus_log_e_at_uniform_marginal():
    E = 4
    uniform = global_entropy_loss(torch.full((5, E), 1 / E)).item()
    assert uniform == pytest.approx(-math.log(E), rel=1e-6)
    skewed = global_entropy_loss(torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 5)).item()
    assert skewed > uniform


def test_losses_of_zero_tokens_are_zero():
    for fn in (z_loss, local_entropy_loss, global_entropy_loss):
        assert fn(torch.zeros(0, 3)).item() == 0.0
    assert load_balance_loss(torch.zeros(0, 3), torch.zeros(0, 1, dtype=torch.long)).item() == 0


# ------------------------------------------------------------------ aux_losses


def _three_token_routing(cfg: MoEConfig, w: torch.Tensor | None = None):
    # identity gate, E = 2, top-1; logits are log-probs:
    #   t0 image: logits [0, ln 3] -> p [.25, .75], lse = ln 4 -> e1
    #   t1 image: logits ln [.8, .2] -> lse = 0               -> e0
    #   t2 text : logits ln [.1, .9] -> lse = 0               -> e1
    x = torch.tensor([[0.0, LN3], [math.log(0.8), math.log(0.2)],
                      [math.log(0.1), math.log(0.9)]])
    mod = torch.tensor([IMAGE, IMAGE, TEXT])
    w = torch.eye(2) if w is None else w
    return route(x, w, mod, cfg, training=True), mod


def test_aux_losses_hand_worked_terms_and_weighted_total():
    cfg = MoEConfig(num_experts=2, top_k=1, dropless=True, load_balance_weight=0.5,
                    z_loss_weight=0.25, local_entropy_weight=0.1, global_entropy_weight=0.2)
    routing, mod = _three_token_routing(cfg)
    total, terms = aux_losses(routing, mod, cfg)
    # load balance: f = [1/3, 2/3], P = [(.25+.8+.1)/3, (.75+.2+.9)/3] = [1.15/3, 1.85/3]
    #   2 * (1.15/9 + 3.7/9) = 9.7/9 = 1.077778
    lb = 9.7 / 9
    # z: ((ln 4)^2 + 0 + 0) / 3 = 1.921812 / 3 = 0.640604
    z = LN4 ** 2 / 3
    # local image: (H(.25,.75) + H(.8,.2)) / 2 = (0.562335 + 0.500402) / 2 = 0.531369
    li = (H(0.25, 0.75) + H(0.8, 0.2)) / 2
    # local text: H(.1, .9) = 0.325083
    lt = H(0.1, 0.9)
    # global image: -H(mean) = -H(.525, .475) = -0.691897; global text: -H(.1, .9)
    gi, gt = -H(0.525, 0.475), -H(0.1, 0.9)
    expected = {"load_balance": lb, "z_loss": z, "local_entropy/image": li,
                "local_entropy/text": lt, "global_entropy/image": gi,
                "global_entropy/text": gt}
    assert set(terms) == set(expected)
    for k, v in expected.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-5), k
    # 0.5*1.077778 + 0.25*0.640604 + 0.1*(0.531369+0.325083) + 0.2*(-0.691897-0.325083)
    #   = 0.538889 + 0.160151 + 0.085645 - 0.203396 = 0.581289
    assert total.item() == pytest.approx(0.581289, rel=1e-5)
    assert total.item() == pytest.approx(0.5 * lb + 0.25 * z + 0.1 * (li + lt)
                                         + 0.2 * (gi + gt), rel=1e-6)


@pytest.mark.parametrize("weights", [
    (1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0),
    (0.0, 0.0, 0.0, 0.0),
])
def test_aux_losses_each_weight_selects_its_term(weights):
    lbw, zw, lw, gw = weights
    cfg = MoEConfig(num_experts=2, dropless=True, load_balance_weight=lbw, z_loss_weight=zw,
                    local_entropy_weight=lw, global_entropy_weight=gw)
    routing, mod = _three_token_routing(cfg)
    total, t = aux_losses(routing, mod, cfg)
    want = (lbw * t["load_balance"] + zw * t["z_loss"]
            + lw * (t["local_entropy/image"] + t["local_entropy/text"])
            + gw * (t["global_entropy/image"] + t["global_entropy/text"]))
    torch.testing.assert_close(total, want)
    if weights == (0.0, 0.0, 0.0, 0.0):
        assert total.item() == 0.0


def test_aux_losses_per_modality_keys_only_for_present_modalities():
    cfg = MoEConfig(num_experts=2, dropless=True, local_entropy_weight=1.0,
                    global_entropy_weight=1.0)
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    img = route(x, torch.eye(2), torch.full((2,), IMAGE), cfg, training=True)
    _, terms = aux_losses(img, torch.full((2,), IMAGE), cfg)
    assert set(terms) == {"load_balance", "z_loss", "local_entropy/image",
                          "global_entropy/image"}
    txt = route(x, torch.eye(2), torch.full((2,), TEXT), cfg, training=True)
    _, terms = aux_losses(txt, torch.full((2,), TEXT), cfg)
    assert set(terms) == {"load_balance", "z_loss", "local_entropy/text", "global_entropy/text"}


def test_per_modality_terms_use_only_that_modality():
    # text term must not see image tokens: text-only probs [.1, .9] -> local H(.1,.9)
    cfg = MoEConfig(num_experts=2, dropless=True)
    routing, mod = _three_token_routing(cfg)
    _, terms = aux_losses(routing, mod, cfg)
    assert terms["local_entropy/text"].item() == pytest.approx(H(0.1, 0.9), rel=1e-5)
    assert terms["global_entropy/text"].item() == pytest.approx(-H(0.1, 0.9), rel=1e-5)


def test_aux_loss_gradient_flows_to_gate_weights():
    cfg = MoEConfig(num_experts=2, dropless=True, load_balance_weight=0.5, z_loss_weight=0.25,
                    local_entropy_weight=0.1, global_entropy_weight=0.2)
    w = torch.eye(2).requires_grad_(True)
    routing, mod = _three_token_routing(cfg, w)
    total, _ = aux_losses(routing, mod, cfg)
    total.backward()
    assert w.grad is not None
    assert torch.isfinite(w.grad).all()
    assert w.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["load_balance", "z_loss", "local", "global"])
def test_each_term_alone_sends_gradient_to_gate(name):
    kw = dict(load_balance_weight=0.0, z_loss_weight=0.0, local_entropy_weight=0.0,
              global_entropy_weight=0.0)
    kw[{"load_balance": "load_balance_weight", "z_loss": "z_loss_weight",
        "local": "local_entropy_weight", "global": "global_entropy_weight"}[name]] = 1.0
    cfg = MoEConfig(num_experts=2, dropless=True, **kw)
    w = torch.tensor([[1.0, 0.2], [0.3, 0.8]], requires_grad=True)
    routing, mod = _three_token_routing(cfg, w)
    total, _ = aux_losses(routing, mod, cfg)
    total.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    # and with every weight zero there is no gradient signal at all
    cfg0 = MoEConfig(num_experts=2, dropless=True, **{k: 0.0 for k in kw})
    w0 = w.detach().clone().requires_grad_(True)
    routing0, mod0 = _three_token_routing(cfg0, w0)
    total0, _ = aux_losses(routing0, mod0, cfg0)
    total0.backward()
    assert w0.grad is None or torch.count_nonzero(w0.grad) == 0

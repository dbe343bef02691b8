"""Router: gate logits -> temperature softmax -> top-k -> capacity, on hand-worked cases.

Most cases use an identity gate (D == E, w_ED = I) so that the gate logits equal the token
vectors; tokens are written as log-probabilities, so softmax(logits) is exactly the
probabilities written in the test.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from expertpar.config import MoEConfig
from expertpar.moe.router import (IMAGE, TEXT, Routing, assignment_priority, capacity_keep,
                                  expert_capacity, expert_choice_capacity, gate_logits,
                                  gate_noise, route)


def logp(rows: list[list[float]]) -> torch.Tensor:
    """Token vectors whose softmax (under an identity gate) is exactly ``rows``."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def eye(e: int) -> torch.Tensor:
    return torch.eye(e)


def text(t: int) -> torch.Tensor:
    return torch.full((t,), TEXT, dtype=torch.long)


class TokenChoiceTables(NamedTuple):
    expert_TK: torch.Tensor
    keep_TK: torch.Tensor
    weight_TK: torch.Tensor


def tc(r: Routing) -> TokenChoiceTables:
    """The token-choice tables (chosen experts best first, kept, combine weight with 0 where
    dropped) rebuilt from the policy-free Routing: token choice routes all T * K choices in
    (token, rank) order, and keeps an entry when its (token, expert) pair is a kept assignment."""
    assert r.policy == "token_choice"
    T, E = r.probs_TE.shape
    expert_TK = r.expert_R.reshape(T, -1)
    K = expert_TK.shape[1]
    assert torch.equal(r.token_R, torch.arange(T).repeat_interleave(K))
    pair_TK = torch.arange(T)[:, None] * E + expert_TK
    match_TKA = pair_TK[:, :, None] == (r.token_A * E + r.expert_A)
    assert int(match_TKA.sum()) == r.token_A.numel()  # every kept pair is one routed entry
    weight_TK = (match_TKA.float() * r.weight_A).sum(-1)
    return TokenChoiceTables(expert_TK, match_TKA.any(-1), weight_TK)


def slow_capacity_keep(expert_TK, score_TK, num_experts, capacity):
    """Greedy reference: choice rank 0 for all tokens first, then rank 1, ...; inside a rank,
    higher score first (ties: lower token index first); an assignment fits if its expert
    still has a free slot."""
    T, K = expert_TK.shape
    used = [0] * num_experts
    keep = [[False] * K for _ in range(T)]
    for k in range(K):
        tokens = sorted(range(T), key=lambda t: (-float(score_TK[t, k]), t))
        for t in tokens:
            e = int(expert_TK[t, k])
            if used[e] < capacity:
                used[e] += 1
                keep[t][k] = True
    return torch.tensor(keep, dtype=torch.bool).reshape(T, K)


# ------------------------------------------------------------------ top-k and weights


def test_top1_picks_argmax_and_keeps_raw_probability():
    # probs per token (hand-chosen): argmax is expert 0, 2, 1.
    x = logp([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.25, 0.7, 0.05]])
    cfg = MoEConfig(num_experts=3, top_k=1, dropless=True)
    r = route(x, eye(3), text(3), cfg, training=True)
    assert tc(r).expert_TK.tolist() == [[0], [2], [1]]
    # top-1 is NOT renormalised: weight is the raw probability, not 1.
    torch.testing.assert_close(tc(r).weight_TK, torch.tensor([[0.6], [0.5], [0.7]]))
    assert r.capacity is None
    assert tc(r).keep_TK.all()


def test_top2_renormalises_weights_to_sum_one():
    # token 0: p = [0.6, 0.3, 0.1] -> experts (0, 1), weights 0.6/0.9 = 2/3, 0.3/0.9 = 1/3
    # token 1: p = [0.2, 0.3, 0.5] -> experts (2, 1), weights 0.5/0.8 = 0.625, 0.3/0.8 = 0.375
    x = logp([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
    cfg = MoEConfig(num_experts=3, top_k=2, dropless=True)
    r = route(x, eye(3), text(2), cfg, training=True)
    assert tc(r).expert_TK.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(tc(r).weight_TK, torch.tensor([[2 / 3, 1 / 3], [0.625, 0.375]]))
    torch.testing.assert_close(tc(r).weight_TK.sum(1), torch.ones(2))


def test_top2_without_renormalize_keeps_raw_probabilities():
    x = logp([[0.6, 0.3, 0.1]])
    cfg = MoEConfig(num_experts=3, top_k=2, dropless=True, renormalize=False)
    r = route(x, eye(3), text(1), cfg, training=True)
    torch.testing.assert_close(tc(r).weight_TK, torch.tensor([[0.6, 0.3]]))


def test_gate_logits_are_x_times_w_transpose_in_fp32():
    # x = [1, 2], w rows [1, 0], [0, 1], [1, 1] -> logits [1, 2, 3]
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    out = gate_logits(x, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 3.0]]))


# ------------------------------------------------------------------ temperature


def test_temperature_scales_logits_before_softmax():
    # logits = ln [6, 3, 1]; alpha = 1 -> p = [0.6, 0.3, 0.1]
    # alpha = 2 -> softmax(2 ln [6, 3, 1]) = [36, 9, 1] / 46 = [0.782609, 0.195652, 0.021739]
    x = torch.tensor([[6.0, 3.0, 1.0]]).log()
    base = route(x, eye(3), text(1), MoEConfig(num_experts=3, dropless=True), training=False)
    sharp = route(x, eye(3), text(1), MoEConfig(num_experts=3, dropless=True, temperature=2.0),
                  training=False)
    torch.testing.assert_close(base.probs_TE, torch.tensor([[0.6, 0.3, 0.1]]))
    torch.testing.assert_close(sharp.probs_TE, torch.tensor([[36 / 46, 9 / 46, 1 / 46]]))
    torch.testing.assert_close(sharp.probs_TE, torch.softmax(2.0 * x, dim=-1))
    # logits are reported temperature-scaled
    torch.testing.assert_close(sharp.logits_TE, 2.0 * x)
    # sharper: the top probability grows, top-1 weight is the raw (sharpened) probability
    assert sharp.probs_TE[0, 0] > base.probs_TE[0, 0]
    assert tc(sharp).weight_TK[0, 0].item() == pytest.approx(36 / 46, rel=1e-6)


def test_low_temperature_flattens():
    # alpha = 0.5: softmax(0.5 ln [4, 1]) = [2, 1] / 3
    x = torch.tensor([[4.0, 1.0]]).log()
    r = route(x, eye(2), text(1), MoEConfig(num_experts=2, dropless=True, temperature=0.5),
              training=False)
    torch.testing.assert_close(r.probs_TE, torch.tensor([[2 / 3, 1 / 3]]))


# ------------------------------------------------------------------ capacity arithmetic


@pytest.mark.parametrize("T,E,K,factor,expected", [
    (10, 4, 1, 1.25, 4),   # ceil(1.25 * 10 * 1 / 4) = ceil(3.125) = 4
    (10, 4, 2, 1.0, 5),    # ceil(10 * 2 / 4) = 5
    (8, 4, 1, 1.0, 2),     # exactly 2, no rounding up
    (8, 4, 1, 1.01, 3),    # ceil(2.02) = 3
    (7, 2, 2, 0.5, 4),     # ceil(0.5 * 7 * 2 / 2) = ceil(3.5) = 4
    (1, 8, 1, 1.0, 1),     # ceil(0.125) = 1
    (3, 100, 1, 0.01, 1),  # ceil(0.0003) = 1: at least one slot when there are tokens
    (5, 1, 1, 2.0, 10),    # one expert, factor 2 -> 10
    (0, 4, 2, 1.25, 0),    # no tokens -> no slots
    # Exact boundaries, where floating point would round up past the integer:
    (100, 2, 1, 1.1, 55),  # 1.1 * 100 / 2 = 55 exactly (in floats 110.00000000000001 / 2 -> 56)
    (100, 4, 2, 1.1, 55),  # 1.1 * 200 / 4 = 55
    (100, 8, 2, 2.2, 55),  # 2.2 * 200 / 8 = 55
    (8, 2, 1, 1.25, 5),    # 1.25 * 8 / 2 = 5 exactly
    (10, 5, 1, 0.5, 1),    # 0.5 * 10 / 5 = 1 exactly
    (6, 3, 1, 2.0, 4),     # 2.0 * 6 / 3 = 4 exactly
    (5, 2, 1, 2, 5),       # an int factor (YAML "2")
    (3, 1, 1, 0.3333, 1),  # 0.9999 -> 1
    (30000, 1, 1, 0.3333, 9999),   # 9999 exactly
    (30001, 1, 1, 0.3333, 10000),  # 9999.3333 -> 10000
    (1, 64, 1, 0.01, 1),   # ceil(0.00015625) = 1: at least one slot when there are tokens
])
def test_expert_capacity_by_hand(T, E, K, factor, expected):
    assert expert_capacity(T, E, K, factor) == expected


@pytest.mark.parametrize("T,E,factor,expected", [
    (100, 2, 1.1, 55),     # 1.1 * 100 / 2 = 55 exactly, not 56
    (4, 2, 1.0, 2),        # 4 / 2 = 2
    (4, 3, 1.5, 2),        # 1.5 * 4 / 3 = 2 exactly
    (10, 4, 1.25, 4),      # ceil(3.125) = 4
    (8, 2, 1.25, 5),       # 5 exactly
    (10, 5, 0.5, 1),       # 1 exactly
    (9, 3, 0.3333, 1),     # 0.9999 -> 1
    (30000, 1, 0.3333, 9999),  # exactly 9999, then capped at T does not bite
    (1, 8, 1.0, 1),        # ceil(0.125) = 1: at least one token per expert
    (4, 2, 4.0, 4),        # ceil(8) = 8 > T: an expert cannot take a token twice -> T
    (4, 1, 1.25, 4),       # ceil(5) = 5 > T -> 4
    (3, 1, 2.0, 3),        # 6 > T -> 3
    (0, 4, 1.25, 0),       # no tokens -> nothing to choose
])
def test_expert_choice_capacity_by_hand(T, E, factor, expected):
    assert expert_choice_capacity(T, E, factor) == expected


@pytest.mark.parametrize("T,E,factor,needle", [
    (-1, 4, 1.0, "T=-1"),
    (4, 0, 1.0, "E=0"),
    (4, 4, 0.0, "factor=0.0"),
    (4, 4, -0.5, "factor=-0.5"),
    (4, 4, float("nan"), "factor=nan"),
    (4, 4, float("inf"), "factor=inf"),
])
def test_expert_choice_capacity_bad_inputs_raise_naming_them(T, E, factor, needle):
    with pytest.raises(ValueError) as info:
        expert_choice_capacity(T, E, factor)
    msg = str(info.value)
    assert needle in msg
    for name in ("T=", "E=", "factor="):
        assert name in msg


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_route_capacity_is_exact(routing):
    # T = 100, E = 2, K = 1, factor 1.1: both policies get 55 (floats would give 56)
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    cfg = MoEConfig(num_experts=2, routing=routing, capacity_factor=1.1)
    r = route(x, eye(2), text(100), cfg, training=True)
    assert r.capacity == 55
    assert int(torch.bincount(r.expert_A, minlength=2).max()) <= 55


@pytest.mark.parametrize("T,E,K,factor,needle", [
    (-1, 4, 1, 1.0, "T=-1"),
    (4, 0, 1, 1.0, "E=0"),
    (4, 4, 0, 1.0, "K=0"),
    (4, 4, 1, 0.0, "factor=0.0"),
    (4, 4, 1, -1.5, "factor=-1.5"),
    (4, 4, 1, float("nan"), "factor=nan"),
    (4, 4, 1, float("inf"), "factor=inf"),
])
def test_expert_capacity_bad_inputs_raise_naming_them(T, E, K, factor, needle):
    with pytest.raises(ValueError) as info:
        expert_capacity(T, E, K, factor)
    msg = str(info.value)
    assert needle in msg
    # every input is named in the message
    for name in ("T=", "E=", "K=", "factor="):
        assert name in msg


def test_route_reports_capacity_from_training_factor_and_eval_factor():
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    cfg = MoEConfig(num_experts=2, top_k=1, capacity_factor=0.5, eval_capacity_factor=1.0)
    # train: ceil(0.5 * 8 / 2) = 2; eval: ceil(1.0 * 8 / 2) = 4
    assert route(x, eye(2), text(8), cfg, training=True).capacity == 2
    assert route(x, eye(2), text(8), cfg, training=False).capacity == 4


def test_eval_capacity_factor_changes_what_is_dropped():
    # all four tokens pick expert 0 with p = 0.6, 0.9, 0.7, 0.8
    x = logp([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    cfg = MoEConfig(num_experts=2, top_k=1, capacity_factor=1.0, eval_capacity_factor=2.0)
    train = route(x, eye(2), text(4), cfg, training=True)   # capacity 2 -> drops two
    evalr = route(x, eye(2), text(4), cfg, training=False)  # capacity 4 -> keeps all
    assert tc(train).keep_TK.sum().item() == 2
    assert tc(evalr).keep_TK.all()


# ------------------------------------------------------------------ dropping order


def test_probability_policy_drops_lowest_probability_first():
    # every token's top-1 is expert 0, p = 0.6, 0.9, 0.7, 0.8; capacity = ceil(1*4*1/2) = 2
    # -> keep the two most confident tokens: 1 (0.9) and 3 (0.8); drop 0 and 2.
    x = logp([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    cfg = MoEConfig(num_experts=2, top_k=1, capacity_factor=1.0, drop_policy="probability")
    r = route(x, eye(2), text(4), cfg, training=True)
    assert r.capacity == 2
    assert tc(r).expert_TK.squeeze(1).tolist() == [0, 0, 0, 0]
    assert tc(r).keep_TK.squeeze(1).tolist() == [False, True, False, True]
    # dropped assignments carry weight 0, kept ones their probability
    torch.testing.assert_close(tc(r).weight_TK.squeeze(1), torch.tensor([0.0, 0.9, 0.0, 0.8]))


def test_position_policy_drops_later_tokens_first():
    # same setup with increasing confidence: p = 0.6, 0.7, 0.8, 0.9 on expert 0, capacity 2.
    # "position" keeps tokens 0, 1; "probability" would keep 2, 3.
    x = logp([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    pos = route(x, eye(2), text(4),
                MoEConfig(num_experts=2, capacity_factor=1.0, drop_policy="position"),
                training=True)
    prob = route(x, eye(2), text(4),
                 MoEConfig(num_experts=2, capacity_factor=1.0, drop_policy="probability"),
                 training=True)
    assert tc(pos).keep_TK.squeeze(1).tolist() == [True, True, False, False]
    assert tc(prob).keep_TK.squeeze(1).tolist() == [False, False, True, True]


def test_top2_first_choices_beat_second_choices():
    # E = 3, K = 2, T = 2, capacity = ceil(0.5 * 2 * 2 / 3) = ceil(0.667) = 1.
    # token 0: p = [0.50, 0.45, 0.05] -> first e0 (0.50), second e1 (0.45)
    # token 1: p = [0.25, 0.40, 0.35] -> first e1 (0.40), second e2 (0.35)
    # Expert 1 is wanted by token 1 as a FIRST choice (p 0.40) and by token 0 as a SECOND
    # choice with a higher p (0.45). First choices go first, so token 1 gets the slot.
    x = logp([[0.50, 0.45, 0.05], [0.25, 0.40, 0.35]])
    cfg = MoEConfig(num_experts=3, top_k=2, capacity_factor=0.5)
    r = route(x, eye(3), text(2), cfg, training=True)
    assert r.capacity == 1
    assert tc(r).expert_TK.tolist() == [[0, 1], [1, 2]]
    assert tc(r).keep_TK.tolist() == [[True, False], [True, True]]
    # weights are the renormalised top-2 probabilities, zeroed where dropped (no second
    # renormalisation): token 0: 0.50/0.95 = 0.526316, 0; token 1: 0.40/0.75, 0.35/0.75
    torch.testing.assert_close(tc(r).weight_TK,
                               torch.tensor([[0.50 / 0.95, 0.0], [0.40 / 0.75, 0.35 / 0.75]]))


def test_top2_second_choices_ranked_by_probability_among_themselves():
    # E = 3, K = 2, T = 3, capacity = ceil(0.75 * 3 * 2 / 3) = ceil(1.5) = 2
    # first choices: t0 -> e0, t1 -> e0, t2 -> e2 (all fit: e0 has 2, e2 has 1)
    # second choices all go to e1: t0 p=0.30, t1 p=0.40, t2 p=0.35 -> keep t1, t2; drop t0.
    x = logp([[0.60, 0.30, 0.10], [0.55, 0.40, 0.05], [0.05, 0.35, 0.60]])
    cfg = MoEConfig(num_experts=3, top_k=2, capacity_factor=0.75)
    r = route(x, eye(3), text(3), cfg, training=True)
    assert r.capacity == 2
    assert tc(r).expert_TK.tolist() == [[0, 1], [0, 1], [2, 1]]
    assert tc(r).keep_TK.tolist() == [[True, False], [True, True], [True, True]]


def test_batch_prioritized_images_text_first_then_images_by_top1():
    # tokens: img p0=.9, txt p0=.55, img p0=.7, txt p0=.6, img p0=.8; all pick expert 0.
    # capacity = ceil(1.0 * 5 * 1 / 2) = 3.
    # BPR: both text tokens first (scores 1.55, 1.6), then the best image (0.9, token 0).
    #      kept = {0, 1, 3}; dropped = image tokens 2 (0.7) and 4 (0.8).
    # Without BPR (probability): kept = the three most confident = {0 (.9), 2 (.7), 4 (.8)}.
    x = logp([[0.9, 0.1], [0.55, 0.45], [0.7, 0.3], [0.6, 0.4], [0.8, 0.2]])
    mod = torch.tensor([IMAGE, TEXT, IMAGE, TEXT, IMAGE])
    bpr = route(x, eye(2), mod, MoEConfig(num_experts=2, capacity_factor=1.0,
                                          batch_prioritized_images=True), training=True)
    plain = route(x, eye(2), mod, MoEConfig(num_experts=2, capacity_factor=1.0),
                  training=True)
    assert bpr.capacity == 3
    assert tc(bpr).keep_TK.squeeze(1).tolist() == [True, True, False, True, False]
    assert tc(plain).keep_TK.squeeze(1).tolist() == [True, False, True, False, True]


def test_batch_prioritized_images_rank_images_by_top1_even_under_position_policy():
    # images only; p(expert 0) increases with position: .6, .7, .8, .9; capacity 2.
    # position policy alone keeps tokens 0, 1; with BPR images are ranked by top-1: keep 2, 3.
    x = logp([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    mod = torch.full((4,), IMAGE)
    cfg = MoEConfig(num_experts=2, capacity_factor=1.0, drop_policy="position",
                    batch_prioritized_images=True)
    r = route(x, eye(2), mod, cfg, training=True)
    assert tc(r).keep_TK.squeeze(1).tolist() == [False, False, True, True]


def test_batch_prioritized_images_second_choice_scored_by_top1():
    # an image token's second choice is scored by the token's top-1 probability.
    # t0 img p=[.5,.3,.2] -> (0: .5, 1: .5); t1 img p=[.1,.2,.7] -> (2: .7, 1: .7)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    expert = torch.tensor([[0, 1], [2, 1]])
    mod = torch.tensor([IMAGE, IMAGE])
    cfg = MoEConfig(num_experts=3, top_k=2, batch_prioritized_images=True)
    score = assignment_priority(probs, expert, mod, cfg)
    torch.testing.assert_close(score, torch.tensor([[0.5, 0.5], [0.7, 0.7]]))
    # text tokens get their own probability + 1
    score_t = assignment_priority(probs, expert, torch.tensor([TEXT, TEXT]), cfg)
    torch.testing.assert_close(score_t, torch.tensor([[1.5, 1.3], [1.7, 1.2]]))


def test_position_priority_scores_by_hand():
    # T = 4: 1 - t / 4 = 1, 0.75, 0.5, 0.25 for every choice
    probs = torch.full((4, 2), 0.5)
    expert = torch.tensor([[0, 1]] * 4)
    cfg = MoEConfig(num_experts=2, top_k=2, drop_policy="position")
    score = assignment_priority(probs, expert, text(4), cfg)
    torch.testing.assert_close(score, torch.tensor([[1.0, 1.0], [0.75, 0.75], [0.5, 0.5],
                                                    [0.25, 0.25]]))


def test_dropless_keeps_everything():
    # all 6 tokens pick expert 0; any finite capacity would drop some.
    x = logp([[0.9, 0.1]] * 6)
    r = route(x, eye(2), text(6),
              MoEConfig(num_experts=2, dropless=True, capacity_factor=0.1), training=True)
    assert r.capacity is None
    assert tc(r).keep_TK.all()
    torch.testing.assert_close(tc(r).weight_TK, torch.full((6, 1), 0.9))
    dropping = route(x, eye(2), text(6), MoEConfig(num_experts=2, capacity_factor=0.1),
                     training=True)
    assert not tc(dropping).keep_TK.all()  # the same inputs do drop without dropless


@pytest.mark.parametrize("seed", range(6))
def test_capacity_keep_matches_slow_greedy_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    T, E, K = 13, 4, 2
    probs = torch.softmax(torch.randn(T, E, generator=gen) * 2, dim=-1)
    _, expert = probs.topk(K, dim=-1)
    score = probs.gather(1, expert)
    for capacity in (1, 2, 3, 5, 13):
        got = capacity_keep(expert, score, E, capacity)
        want = slow_capacity_keep(expert, score, E, capacity)
        assert torch.equal(got, want), (capacity, got, want)
        kept_per_expert = torch.bincount(expert[got], minlength=E)
        assert int(kept_per_expert.max()) <= capacity


def test_capacity_keep_ties_keep_earlier_token():
    # equal scores: the earlier token wins the only slot
    expert = torch.tensor([[0], [0], [0]])
    score = torch.tensor([[0.5], [0.5], [0.5]])
    assert capacity_keep(expert, score, 2, 1).squeeze(1).tolist() == [True, False, False]


# ------------------------------------------------------------------ noisy gating


def _noisy_inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=gen), torch.randn(4, 5, generator=gen)


def test_noise_is_deterministic_given_seed_and_changes_with_seed():
    x, w = _noisy_inputs()
    cfg = MoEConfig(num_experts=4, top_k=2, noise_std=1.0, dropless=True, temperature=1.5)
    a = route(x, w, text(6), cfg, training=True, noise_seed=5)
    b = route(x, w, text(6), cfg, training=True, noise_seed=5)
    c = route(x, w, text(6), cfg, training=True, noise_seed=6)
    assert torch.equal(a.logits_TE, b.logits_TE)
    assert torch.equal(tc(a).expert_TK, tc(b).expert_TK)
    assert not torch.allclose(a.logits_TE, c.logits_TE)
    # exact formula: alpha * (x w^T + std * N(seed))
    want = 1.5 * (x @ w.t() + 1.0 * gate_noise((6, 4), 5))
    torch.testing.assert_close(a.logits_TE, want)


def test_gate_noise_is_a_pure_function_of_seed():
    torch.manual_seed(123)
    a = gate_noise((3, 4), 7)
    torch.manual_seed(999)  # the global RNG must not matter
    b = gate_noise((3, 4), 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, gate_noise((3, 4), 8))


def test_no_noise_in_eval():
    x, w = _noisy_inputs()
    cfg = MoEConfig(num_experts=4, noise_std=1.0, dropless=True)
    r1 = route(x, w, text(6), cfg, training=False, noise_seed=5)
    r2 = route(x, w, text(6), cfg, training=False, noise_seed=6)
    r3 = route(x, w, text(6), cfg, training=False)  # no seed needed in eval
    torch.testing.assert_close(r1.logits_TE, x @ w.t())
    assert torch.equal(r1.logits_TE, r2.logits_TE)
    assert torch.equal(r1.logits_TE, r3.logits_TE)


def test_noise_without_seed_is_an_error_in_training():
    x, w = _noisy_inputs()
    cfg = MoEConfig(num_experts=4, noise_std=0.5)
    with pytest.raises(ValueError, match="noise_seed"):
        route(x, w, text(6), cfg, training=True)
    # noise_std = 0 needs no seed
    route(x, w, text(6), MoEConfig(num_experts=4), training=True)


def test_probs_are_softmax_of_scaled_logits_on_random_inputs():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 6, generator=gen), torch.randn(5, 6, generator=gen)
    cfg = MoEConfig(num_experts=5, top_k=3, temperature=0.7, dropless=True)
    r = route(x, w, text(7), cfg, training=True)
    torch.testing.assert_close(r.probs_TE, torch.softmax(0.7 * (x @ w.t()), dim=-1))
    # chosen experts are the 3 most probable, best first
    sorted_idx = torch.argsort(r.probs_TE, dim=-1, descending=True)[:, :3]
    assert torch.equal(tc(r).expert_TK, sorted_idx)
    assert math.isclose(float(tc(r).weight_TK.sum()), 7.0, rel_tol=1e-6)

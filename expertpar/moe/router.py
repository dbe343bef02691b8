"""Routing: gate logits -> temperature softmax -> a routing policy -> kept assignments.

Shape legend: T tokens, D model dim, E experts, K experts chosen per token (token choice),
C tokens chosen per expert (expert choice), R routed assignments (what the policy chose,
before any capacity limit), A kept assignments (the rows dispatched to experts; A is a subset
of R). An assignment is one (token, expert) pair.

The policy is ``model.moe.routing``:

* ``token_choice`` (Switch / GShard): each token picks its top-k experts; an expert takes at
  most ``expert_capacity`` of them and the rest are dropped (unless dropless).
* ``expert_choice`` (Zhou et al. 2022): each expert picks its top-C tokens, C =
  ``expert_choice_capacity``; a token may get 0..E experts and nothing is ever over capacity.

Both produce the same ``Routing``, so dispatch, combine, the auxiliary losses and the
statistics never ask which policy ran, except where the policy changes what a quantity means
(the load-balancing loss, the drop rate; see losses.py and stats.py).

``route`` is a pure function of its inputs (the noise comes from an explicit seed), so the
in-process layer and a router living in another process compute bit-identical routing.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import MoEConfig

IMAGE, TEXT = 0, 1  # modality ids carried per token
MODALITIES = {IMAGE: "image", TEXT: "text"}


@dataclass(frozen=True)
class Routing:
    """One layer's routing decision, whatever the policy.

    Invariants every policy keeps (dispatch relies on them): ``expert_A`` is non-decreasing
    (rows grouped by expert, in expert order); inside one expert ``token_A`` is increasing; a
    (token, expert) pair occurs at most once in A and at most once in R.
    """
    policy: str  # the MoEConfig.routing value that produced it
    logits_TE: torch.Tensor  # fp32, temperature-scaled, noise included when training
    probs_TE: torch.Tensor  # fp32 softmax(alpha * logits) over experts
    token_A: torch.Tensor  # int64 token of each kept assignment, grouped by expert
    expert_A: torch.Tensor  # int64 expert of each kept assignment, non-decreasing
    weight_A: torch.Tensor  # fp32 combine weight of each kept assignment, differentiable
    token_R: torch.Tensor  # int64 token of each routed assignment (before capacity)
    expert_R: torch.Tensor  # int64 expert of each routed assignment
    capacity: Optional[int]  # per expert: slots (token choice) or C (expert choice); None dropless

    @property
    def num_tokens(self) -> int:
        return self.probs_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[1]


# ------------------------------------------------------------------ capacity arithmetic


def _exact_factor(factor) -> Fraction:
    """The capacity factor as the decimal the user wrote: Fraction('1.1') is 11/10, whereas
    Fraction(1.1) is the binary double just above it and 1.1 * 100 gives 110.00000000000001."""
    try:
        return Fraction(str(factor))
    except (ValueError, TypeError, ZeroDivisionError):
        return Fraction(0)  # not a finite number: the callers' check reports it


def _ceil_div(num: int, den: int) -> int:
    return -(-num // den)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Token-choice slots per expert: ceil(factor * T * K / E), exactly (integer arithmetic on
    the factor's decimal value), at least 1 when there are tokens."""
    f = _exact_factor(factor)
    if num_tokens < 0 or num_experts < 1 or top_k < 1 or not f > 0:
        raise ValueError(f"expert_capacity: need T >= 0, E >= 1, K >= 1, factor > 0; got "
                         f"T={num_tokens}, E={num_experts}, K={top_k}, factor={factor}")
    if num_tokens == 0:
        return 0
    return max(1, _ceil_div(f.numerator * num_tokens * top_k, f.denominator * num_experts))


def expert_choice_capacity(num_tokens: int, num_experts: int, factor: float) -> int:
    """Expert-choice tokens per expert: C = ceil(factor * T / E) exactly, at least 1 when there
    are tokens, at most T (an expert cannot pick a token twice)."""
    f = _exact_factor(factor)
    if num_tokens < 0 or num_experts < 1 or not f > 0:
        raise ValueError(f"expert_choice_capacity: need T >= 0, E >= 1, factor > 0; got "
                         f"T={num_tokens}, E={num_experts}, factor={factor}")
    if num_tokens == 0:
        return 0
    c = _ceil_div(f.numerator * num_tokens, f.denominator * num_experts)
    return min(num_tokens, max(1, c))


# ------------------------------------------------------------------ gate


def gate_logits(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    # fp32 whatever the activations' dtype: the softmax over experts is sensitive to rounding.
    return F.linear(x_TD.float(), w_ED.float())


def gate_noise(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Standard normal noise as a pure function of ``seed`` (same in every process)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen)


def gate_probs(x_TD: torch.Tensor, w_ED: torch.Tensor, cfg: MoEConfig, *, training: bool,
               noise_seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_TE, probs_TE): alpha * (x W^T + noise_std * N(seed)), and its softmax over
    experts. Shared by every policy; the noise is added only when training."""
    T, E = x_TD.shape[0], w_ED.shape[0]
    logits_TE = gate_logits(x_TD, w_ED)
    if training and cfg.noise_std > 0:
        if noise_seed is None:
            raise ValueError("noisy gating needs a noise_seed (step and layer derived)")
        logits_TE = logits_TE + cfg.noise_std * gate_noise((T, E), noise_seed).to(logits_TE.device)
    logits_TE = cfg.temperature * logits_TE
    return logits_TE, torch.softmax(logits_TE, dim=-1)


# ------------------------------------------------------------------ token choice


def assignment_priority(probs_TE: torch.Tensor, expert_TK: torch.Tensor,
                        modality_T: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Higher keeps first. Scores lie in (0, 1]; text gets +1 under batch-prioritised images."""
    T, K = expert_TK.shape
    if cfg.drop_policy == "probability":
        score_TK = probs_TE.gather(1, expert_TK)
    else:  # "position": earlier tokens first, as in the Switch Transformer
        pos_T = 1.0 - torch.arange(T, dtype=torch.float32, device=probs_TE.device) / max(T, 1)
        score_TK = pos_T[:, None].expand(T, K).clone()
    if cfg.batch_prioritized_images:
        # V-MoE BPR for image tokens: rank image patches by their top-1 gate probability,
        # and let (few, information-dense) text tokens go first.
        is_image_T = modality_T == IMAGE
        top1_T = probs_TE.max(dim=1).values
        score_TK = torch.where(is_image_T[:, None], top1_T[:, None].expand(T, K), score_TK + 1.0)
    return score_TK


def capacity_keep(expert_TK: torch.Tensor, score_TK: torch.Tensor, num_experts: int,
                  capacity: int) -> torch.Tensor:
    """Which assignments fit: all first choices before any second choice, then by score."""
    T, K = expert_TK.shape
    # k-major flattening so that choice rank dominates; a stable sort on -score within it.
    e_A = expert_TK.t().reshape(-1)
    score_A = score_TK.t().reshape(-1)
    rank_A = torch.arange(K, device=expert_TK.device).repeat_interleave(T)
    order = torch.argsort(-score_A, stable=True)
    order = order[torch.argsort(rank_A[order], stable=True)]
    onehot_AE = F.one_hot(e_A[order], num_experts)
    slot_A = (onehot_AE.cumsum(0) * onehot_AE).sum(1) - 1  # position within its expert
    keep_A = torch.empty(T * K, dtype=torch.bool, device=expert_TK.device)
    keep_A[order] = slot_A < capacity
    return keep_A.reshape(K, T).t()


def token_choice_assignments(expert_TK: torch.Tensor, weight_TK: torch.Tensor,
                             keep_TK: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_A, expert_A, weight_A) of the kept entries of token-choice tables, grouped by
    expert; weights of dropped entries are never read."""
    T, K = expert_TK.shape
    slot_S = torch.nonzero(keep_TK.reshape(-1)).squeeze(1)  # flat t * K + k, increasing
    expert_S = expert_TK.reshape(-1)[slot_S]
    # A stable sort keeps token order inside each expert (deterministic, and cache friendly).
    order = torch.argsort(expert_S, stable=True)
    slot_A = slot_S[order]
    return slot_A // K, expert_S[order], weight_TK.reshape(-1)[slot_A]


def token_choice(logits_TE: torch.Tensor, probs_TE: torch.Tensor, modality_T: torch.Tensor,
                 cfg: MoEConfig, *, training: bool) -> Routing:
    """Each token picks its top-k experts (best first); over capacity, the lowest-priority
    assignments are dropped. Routed R are all T * K choices in (token, rank) order."""
    T, E = probs_TE.shape
    K = cfg.top_k
    if not 1 <= K <= E:
        raise ValueError(f"token choice: need 1 <= top_k <= num_experts; got top_k={K}, E={E}")
    top_p_TK, expert_TK = probs_TE.topk(K, dim=-1)
    if K > 1 and cfg.renormalize:
        top_p_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
    factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    if cfg.dropless:
        capacity = None
        keep_TK = torch.ones_like(expert_TK, dtype=torch.bool)
    else:
        capacity = expert_capacity(T, E, K, factor)
        score_TK = assignment_priority(probs_TE.detach(), expert_TK, modality_T, cfg)
        keep_TK = capacity_keep(expert_TK, score_TK, E, capacity)
    token_A, expert_A, weight_A = token_choice_assignments(expert_TK, top_p_TK, keep_TK)
    token_R = torch.arange(T, device=probs_TE.device).repeat_interleave(K)
    return Routing(policy="token_choice", logits_TE=logits_TE, probs_TE=probs_TE,
                   token_A=token_A, expert_A=expert_A, weight_A=weight_A,
                   token_R=token_R, expert_R=expert_TK.reshape(-1), capacity=capacity)


# ------------------------------------------------------------------ expert choice


def expert_choice(logits_TE: torch.Tensor, probs_TE: torch.Tensor, modality_T: torch.Tensor,
                  cfg: MoEConfig, *, training: bool) -> Routing:
    """Each expert picks the C tokens with the highest probs_TE[:, e]; the combine weight of
    (t, e) is probs_TE[t, e]. Nothing is dropped after choosing, so R == A. top_k, renormalize,
    drop_policy and batch_prioritized_images do not apply and are ignored."""
    T, E = probs_TE.shape
    if cfg.dropless:
        raise ValueError("expert choice: dropless must be false (each expert takes exactly "
                         f"C = ceil(capacity_factor * T / E) tokens); got dropless={cfg.dropless}")
    factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    C = expert_choice_capacity(T, E, factor)
    # A stable sort of -p rather than topk: topk does not promise which of equal
    # probabilities wins, and the router actor must reproduce the in-process choice exactly.
    order_ET = torch.argsort(-probs_TE.detach().t(), dim=1, stable=True)
    # Token order inside each expert, the order token choice dispatches in.
    chosen_EC = order_ET[:, :C].sort(dim=1).values
    token_A = chosen_EC.reshape(-1)
    expert_A = torch.arange(E, device=probs_TE.device).repeat_interleave(C)
    weight_A = probs_TE[token_A, expert_A]
    return Routing(policy="expert_choice", logits_TE=logits_TE, probs_TE=probs_TE,
                   token_A=token_A, expert_A=expert_A, weight_A=weight_A,
                   token_R=token_A, expert_R=expert_A, capacity=C)


# ------------------------------------------------------------------ the seam


RoutingPolicy = Callable[..., Routing]  # (logits_TE, probs_TE, modality_T, cfg, *, training)
POLICIES: dict[str, RoutingPolicy] = {"token_choice": token_choice,
                                      "expert_choice": expert_choice}


def route(x_TD: torch.Tensor, w_ED: torch.Tensor, modality_T: torch.Tensor, cfg: MoEConfig,
          *, training: bool, noise_seed: Optional[int] = None) -> Routing:
    """Gate, then the policy named by ``cfg.routing``."""
    policy = POLICIES.get(cfg.routing)
    if policy is None:
        raise ValueError(f"route: unknown routing {cfg.routing!r}; expected one of "
                         f"{sorted(POLICIES)}")
    T = x_TD.shape[0]
    if w_ED.shape[0] != cfg.num_experts or x_TD.shape[1:] != w_ED.shape[1:]:
        raise ValueError(f"route: gate w_ED {tuple(w_ED.shape)} must be (num_experts="
                         f"{cfg.num_experts}, D) with x_TD {tuple(x_TD.shape)}")
    if tuple(modality_T.shape) != (T,):
        raise ValueError(f"route: modality_T has shape {tuple(modality_T.shape)}, expected ({T},)")
    logits_TE, probs_TE = gate_probs(x_TD, w_ED, cfg, training=training, noise_seed=noise_seed)
    return policy(logits_TE, probs_TE, modality_T, cfg, training=training)

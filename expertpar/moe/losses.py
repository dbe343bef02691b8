"""Auxiliary router losses, each a plain function of the routing (returned, never global).

Shape legend: T tokens, E experts, R routed assignments (chosen before any capacity limit).

Minima, for the tests: load balance is 1 at a uniform router; z-loss is (log E)^2 at zero logits and 0 where logsumexp is 0;
local entropy is 0 for one-hot routing; the global term is -log E when experts are used evenly.
"""
from __future__ import annotations

import torch

from ..config import MoEConfig
from .router import MODALITIES, Routing


def load_balance_loss(probs_TE: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
    """Switch Transformer: E * sum_e f_e * P_e, f = share of routed (top-k) assignments, before
    capacity, P = mean prob. ``expert_R`` may have any shape (e.g. a token-choice expert_TK)."""
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    f_E = torch.bincount(expert_R.reshape(-1), minlength=E).float() / expert_R.numel()
    P_E = probs_TE.mean(dim=0)
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean of logsumexp(logits)^2, keeps gate logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)


def local_entropy_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """LIMoE local term: mean per-token routing entropy (low = decisive tokens)."""
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    return _entropy(probs_TE).mean()


def global_entropy_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """LIMoE global term: minus the entropy of the mean routing (low = experts used evenly)."""
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    return -_entropy(probs_TE.mean(dim=0))


def aux_losses(routing: Routing, modality_T: torch.Tensor,
               cfg: MoEConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total, {name: unweighted value}) for one MoE layer.

    The z-loss and the per-modality LIMoE entropy terms apply to every policy. The
    load-balancing loss applies to token choice only: under expert choice every expert takes
    exactly C tokens, so load is balanced by construction and the term has no meaning there.
    It is then neither added to the total nor reported (no "load_balance" key), and
    ``cfg.load_balance_weight`` is ignored.
    """
    terms: dict[str, torch.Tensor] = {}
    if routing.policy == "token_choice":
        terms["load_balance"] = load_balance_loss(routing.probs_TE, routing.expert_R)
        terms["z_loss"] = z_loss(routing.logits_TE)
        total = (cfg.load_balance_weight * terms["load_balance"]
                 + cfg.z_loss_weight * terms["z_loss"])
    else:
        terms["z_loss"] = z_loss(routing.logits_TE)
        total = cfg.z_loss_weight * terms["z_loss"]
    for mid, name in MODALITIES.items():
        probs = routing.probs_TE[modality_T == mid]
        if probs.shape[0] == 0:
            continue
        terms[f"local_entropy/{name}"] = local_entropy_loss(probs)
        terms[f"global_entropy/{name}"] = global_entropy_loss(probs)
        total = total + cfg.local_entropy_weight * terms[f"local_entropy/{name}"]
        total = total + cfg.global_entropy_weight * terms[f"global_entropy/{name}"]
    return total, terms

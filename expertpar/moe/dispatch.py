"""Dispatch tokens to experts and combine their outputs back (the inverse of dispatch).

Shape legend: T tokens, D model dim, E experts, A kept assignments (token, expert).

A kept assignment becomes a row of ``x_AD``; the routing already groups rows by expert, so each
expert sees one contiguous slice, whichever policy routed. The plan holds indices only, so it
can travel to another process cheaply; the combine weights carry gradients and are passed
separately.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .router import Routing


@dataclass(frozen=True)
class DispatchPlan:
    token_A: torch.Tensor  # int64 token index of each kept assignment, grouped by expert
    counts_E: tuple[int, ...]  # rows per expert, in expert order
    num_tokens: int

    def split(self, x_AD: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(x_AD, list(self.counts_E)))


def make_plan(routing: Routing) -> DispatchPlan:
    token_A, expert_A = routing.token_A, routing.expert_A
    if token_A.shape != expert_A.shape or token_A.shape != routing.weight_A.shape:
        raise ValueError(f"make_plan: token_A {tuple(token_A.shape)}, expert_A "
                         f"{tuple(expert_A.shape)} and weight_A {tuple(routing.weight_A.shape)} "
                         f"must have one entry per assignment")
    # Splitting by counts_E is only right if rows come grouped in expert order.
    if expert_A.numel() > 1 and not bool((expert_A[1:] >= expert_A[:-1]).all()):
        raise ValueError(f"make_plan: expert_A must be grouped by expert (non-decreasing); got "
                         f"{expert_A.tolist()}")
    counts_E = torch.bincount(expert_A, minlength=routing.num_experts).tolist()
    if len(counts_E) != routing.num_experts:
        raise ValueError(f"make_plan: expert index {int(expert_A.max())} out of range for "
                         f"E={routing.num_experts}")
    return DispatchPlan(token_A=token_A, counts_E=tuple(counts_E),
                        num_tokens=routing.num_tokens)


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    return x_TD.index_select(0, plan.token_A)


def combine(y_AD: torch.Tensor, weight_A: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_TD = sum over kept assignments of weight * expert output; a token with no kept
    assignment gets zeros."""
    contrib_AD = y_AD * weight_A.to(y_AD.dtype)[:, None]
    y_TD = y_AD.new_zeros((plan.num_tokens, y_AD.shape[1]))
    return y_TD.index_add(0, plan.token_A, contrib_AD)

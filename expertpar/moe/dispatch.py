"""Dispatch tokens to experts and combine their outputs back (the inverse of dispatch).

A kept assignment (token t, choice k) becomes a row of ``x_AD``; rows are grouped by expert so
each expert sees one contiguous slice. The plan holds indices only, so it can travel to another
process cheaply; the combine weights carry gradients and are passed separately.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .router import Routing


@dataclass(frozen=True)
class DispatchPlan:
    token_A: torch.Tensor  # int64 token index of each kept assignment, grouped by expert
    slot_A: torch.Tensor  # int64 flat (t * K + k) index into weight_TK, to gather weights
    counts_E: tuple[int, ...]  # rows per expert, in expert order
    num_tokens: int

    def split(self, x_AD: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(x_AD, list(self.counts_E)))


def make_plan(routing: Routing) -> DispatchPlan:
    T, K = routing.expert_TK.shape
    E = routing.probs_TE.shape[1]
    keep_S = routing.keep_TK.reshape(-1)
    slot_S = torch.nonzero(keep_S).squeeze(1)
    expert_S = routing.expert_TK.reshape(-1)[slot_S]
    # A stable sort keeps token order inside each expert (deterministic, and cache friendly).
    order = torch.argsort(expert_S, stable=True)
    slot_A = slot_S[order]
    counts_E = torch.bincount(expert_S, minlength=E).tolist()
    return DispatchPlan(token_A=slot_A // K, slot_A=slot_A, counts_E=tuple(counts_E),
                        num_tokens=T)


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    return x_TD.index_select(0, plan.token_A)


def combine(y_AD: torch.Tensor, weight_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_TD = sum over kept choices of weight * expert output; dropped tokens get zeros."""
    weight_A = weight_TK.reshape(-1).index_select(0, plan.slot_A)
    contrib_AD = y_AD * weight_A.to(y_AD.dtype)[:, None]
    y_TD = y_AD.new_zeros((plan.num_tokens, y_AD.shape[1]))
    return y_TD.index_add(0, plan.token_A, contrib_AD)

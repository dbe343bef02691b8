"""Routing statistics of one MoE layer: plain detached tensors that add up over steps.

Shape legend: M modalities (image, text), E experts, T tokens, R routed and A kept assignments.

What "drop rate" means depends on the routing policy:

* token choice: the share of routed assignments (top-k choices) that the capacity limit
  dropped, 1 - kept / routed; a top-2 token that lost only its second choice counts 1/2.
* expert choice: nothing is dropped after the experts choose (routed == kept, the chosen
  assignments), so the drop rate is the share of tokens that no expert chose; such a token
  leaves the layer through the residual only, as a dropped token does under token choice.

Router entropy is the mean per-token entropy of probs_TE under both policies.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .router import MODALITIES, Routing


@dataclass
class RoutingStats:
    routed_ME: torch.Tensor  # assignments the policy chose (before capacity), per modality, expert
    kept_ME: torch.Tensor  # assignments that were dispatched (survived the capacity limit)
    entropy_sum_M: torch.Tensor  # sum over tokens of routing entropy, per modality
    tokens_M: torch.Tensor  # tokens per modality
    unrouted_M: torch.Tensor  # tokens with no kept assignment (no expert at all), per modality
    policy: str = "token_choice"  # the Routing.policy these come from; decides the drop rate

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor field, in field order (to move them as one message)."""
        return [getattr(self, f.name) for f in fields(self) if f.name != "policy"]

    @staticmethod
    def from_tensors(tensors: list[torch.Tensor], policy: str) -> "RoutingStats":
        return RoutingStats(*tensors, policy=policy)

    @staticmethod
    def of(routing: Routing, modality_T: torch.Tensor) -> "RoutingStats":
        E = routing.num_experts
        T = routing.num_tokens
        M = len(MODALITIES)
        with torch.no_grad():
            def per_modality_expert(token_X: torch.Tensor, expert_X: torch.Tensor):
                flat = modality_T[token_X] * E + expert_X
                return torch.bincount(flat, minlength=M * E).reshape(M, E)

            routed = per_modality_expert(routing.token_R, routing.expert_R)
            kept = per_modality_expert(routing.token_A, routing.expert_A)
            served_T = torch.zeros(T, dtype=torch.bool, device=modality_T.device)
            served_T[routing.token_A] = True
            unrouted = torch.bincount(modality_T[~served_T], minlength=M)
            p = routing.probs_TE
            ent_T = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
            ent = torch.zeros(M, device=p.device).index_add_(0, modality_T, ent_T)
            toks = torch.bincount(modality_T, minlength=M).float()
        # Statistics are small; keep them on the CPU so they add up across devices and processes.
        return RoutingStats(routed.float().cpu(), kept.float().cpu(), ent.cpu(), toks.cpu(),
                            unrouted.float().cpu(), routing.policy)

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        if self.policy != other.policy:
            raise ValueError(f"RoutingStats: cannot add {self.policy!r} and {other.policy!r} "
                             f"statistics (their drop rates mean different things)")
        return RoutingStats(self.routed_ME + other.routed_ME, self.kept_ME + other.kept_ME,
                            self.entropy_sum_M + other.entropy_sum_M,
                            self.tokens_M + other.tokens_M,
                            self.unrouted_M + other.unrouted_M, self.policy)

    def _drop_rate(self, rows: slice | int) -> float:
        if self.policy == "expert_choice":
            tokens = float(self.tokens_M[rows].sum())
            return float(self.unrouted_M[rows].sum()) / tokens if tokens else 0.0
        routed = float(self.routed_ME[rows].sum())
        return 1.0 - float(self.kept_ME[rows].sum()) / routed if routed else 0.0

    def summary(self, prefix: str) -> dict[str, float]:
        """Flat metrics: drop rate, entropy, and each expert's share of tokens per modality."""
        out: dict[str, float] = {}
        out[f"{prefix}/drop_rate"] = self._drop_rate(slice(None))
        tokens = float(self.tokens_M.sum())
        out[f"{prefix}/router_entropy"] = float(self.entropy_sum_M.sum()) / tokens if tokens else 0.0
        for mid, name in MODALITIES.items():
            # Tokens, not routed assignments: under expert choice a modality can have tokens
            # that no expert chose, and its drop rate (1.0) is exactly what must be reported.
            if not float(self.tokens_M[mid]):
                continue
            out[f"{prefix}/{name}/drop_rate"] = self._drop_rate(mid)
            out[f"{prefix}/{name}/router_entropy"] = (
                float(self.entropy_sum_M[mid]) / float(self.tokens_M[mid]))
            for e, count in enumerate(self.kept_ME[mid].tolist()):
                out[f"{prefix}/{name}/tokens_expert{e}"] = count
        return out

"""Routing statistics of one MoE layer: plain detached tensors that add up over steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .router import MODALITIES, Routing


@dataclass
class RoutingStats:
    routed_ME: torch.Tensor  # assignments chosen by top-k, per modality and expert
    kept_ME: torch.Tensor  # assignments that survived the capacity limit
    entropy_sum_M: torch.Tensor  # sum over tokens of routing entropy, per modality
    tokens_M: torch.Tensor  # tokens per modality

    @staticmethod
    def of(routing: Routing, modality_T: torch.Tensor) -> "RoutingStats":
        E = routing.probs_TE.shape[1]
        M = len(MODALITIES)
        with torch.no_grad():
            K = routing.expert_TK.shape[1]
            mod_A = modality_T.repeat_interleave(K)
            e_A = routing.expert_TK.reshape(-1)
            keep_A = routing.keep_TK.reshape(-1)
            flat = mod_A * E + e_A
            routed = torch.bincount(flat, minlength=M * E).reshape(M, E)
            kept = torch.bincount(flat[keep_A], minlength=M * E).reshape(M, E)
            p = routing.probs_TE
            ent_T = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
            ent = torch.zeros(M, device=p.device).index_add_(0, modality_T, ent_T)
            toks = torch.bincount(modality_T, minlength=M).float()
        # Statistics are small; keep them on the CPU so they add up across devices and processes.
        return RoutingStats(routed.float().cpu(), kept.float().cpu(), ent.cpu(), toks.cpu())

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        return RoutingStats(self.routed_ME + other.routed_ME, self.kept_ME + other.kept_ME,
                            self.entropy_sum_M + other.entropy_sum_M,
                            self.tokens_M + other.tokens_M)

    def summary(self, prefix: str) -> dict[str, float]:
        """Flat metrics: drop rate, entropy, and each expert's share of tokens per modality."""
        out: dict[str, float] = {}
        routed = float(self.routed_ME.sum())
        out[f"{prefix}/drop_rate"] = 1.0 - float(self.kept_ME.sum()) / routed if routed else 0.0
        tokens = float(self.tokens_M.sum())
        out[f"{prefix}/router_entropy"] = float(self.entropy_sum_M.sum()) / tokens if tokens else 0.0
        for mid, name in MODALITIES.items():
            n = float(self.routed_ME[mid].sum())
            if not n:
                continue
            out[f"{prefix}/{name}/drop_rate"] = 1.0 - float(self.kept_ME[mid].sum()) / n
            out[f"{prefix}/{name}/router_entropy"] = (
                float(self.entropy_sum_M[mid]) / float(self.tokens_M[mid]))
            for e, count in enumerate(self.kept_ME[mid].tolist()):
                out[f"{prefix}/{name}/tokens_expert{e}"] = count
        return out

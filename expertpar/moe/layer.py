"""The sparse MoE layer: route -> dispatch -> experts -> combine, plus aux losses and stats.

Shape legend: T tokens, D model dim, E experts, A kept assignments (rows sent to experts).

Model code calls every MoE layer as ``layer(x_TD, modality_T, ctx) -> MoEOutput``, whichever
backend built it (see backend.py). The routing policy (``cfg.routing``: token choice or expert
choice) is decided inside ``route``; everything after it reads the policy-free ``Routing``, so
an expert backend only ever sees ``forward(x_AD, counts_E) -> y_AD``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from ..config import MoEConfig
from .dispatch import combine, dispatch, make_plan
from .experts import ExpertBackend, LocalExperts, init_expert_
from .losses import aux_losses
from .router import route
from .stats import RoutingStats


@dataclass(frozen=True)
class RouteContext:
    """What routing needs besides activations: the run seed and the global step (noise)."""
    seed: int = 0
    step: int = 0

    def noise_seed(self, layer_index: int) -> int:
        return ((self.seed * 1_000_003 + self.step) * 1009 + layer_index) % (2**63)


class MoEOutput(NamedTuple):
    y_TD: torch.Tensor
    aux_loss: torch.Tensor  # weighted sum of the auxiliary losses, differentiable
    aux: dict[str, torch.Tensor]  # each unweighted term, detached, for logging
    stats: RoutingStats


class Gate(nn.Module):
    """The gating network: one linear map to expert logits (no bias, as Switch/GShard)."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.w_ED = nn.Parameter(torch.zeros(num_experts, dim))


class MoELayer(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig, layer_index: int, *, seed: int = 0,
                 experts: ExpertBackend | None = None):
        super().__init__()
        self.cfg = cfg
        self.layer_index = layer_index
        self.gate = Gate(dim, cfg.num_experts)
        gen = torch.Generator().manual_seed(seed * 7919 + layer_index)
        with torch.no_grad():
            self.gate.w_ED.copy_(torch.randn(self.gate.w_ED.shape, generator=gen) * 0.02)
        if experts is None:
            experts = LocalExperts(cfg.num_experts, dim, cfg.expert_hidden,
                                   cfg.expert_precision)
            for e, expert in enumerate(experts.experts):
                init_expert_(expert, expert_seed(seed, layer_index, e))
        self.experts = experts

    def forward(self, x_TD: torch.Tensor, modality_T: torch.Tensor,
                ctx: RouteContext = RouteContext()) -> MoEOutput:
        routing = route(x_TD, self.gate.w_ED, modality_T, self.cfg, training=self.training,
                        noise_seed=ctx.noise_seed(self.layer_index))
        plan = make_plan(routing)
        y_AD = self.experts(dispatch(x_TD, plan), plan.counts_E)
        y_TD = combine(y_AD, routing.weight_A, plan)
        aux_loss, aux = aux_losses(routing, modality_T, self.cfg)
        aux = {k: v.detach() for k, v in aux.items()}
        return MoEOutput(y_TD, aux_loss, aux, RoutingStats.of(routing, modality_T))


def expert_seed(seed: int, layer_index: int, expert: int) -> int:
    return (seed * 1_000_003 + layer_index * 10_007 + expert + 1) % (2**63)

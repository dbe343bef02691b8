"""The sparse MoE layer: route -> dispatch -> experts -> combine, plus aux losses and stats.

Shape legend: T tokens, D model dim, E experts, A kept assignments (rows sent to experts).

Model code calls every MoE layer as ``layer(x_TD, modality_T, ctx) -> MoEOutput``, whichever
backend built it (see backend.py). The routing policy (``cfg.routing``: token choice or expert
choice) is decided inside ``route``; everything after it reads the policy-free ``Routing``, so
an expert backend only ever sees ``forward(x_AD, counts_E) -> y_AD``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn

from ..config import MoEConfig
from .dispatch import combine, dispatch, make_plan
from .experts import ExpertBackend, LocalExperts, init_expert_
from .losses import aux_losses
from .router import Routing, route
from .stats import RoutingStats


@dataclass(frozen=True)
class RouteContext:
    """What routing needs besides activations: the run seed and the global step (noise)."""
    seed: int = 0
    step: int = 0

    def noise_seed(self, layer_index: int, group: int = 0) -> int:
        base = ((self.seed * 1_000_003 + self.step) * 1009 + layer_index) % (2**63)
        # Each routing group draws its own noise (group 0 keeps the ungrouped stream).
        return base if group == 0 else (base * 31 + group * 1_000_033) % (2**63)


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
                                   cfg.expert_precision, cfg.activation)
            for e, expert in enumerate(experts.experts):
                init_expert_(expert, expert_seed(seed, layer_index, e))
        self.experts = experts

    @property
    def routing_groups(self) -> int:
        return self.cfg.routing_groups

    def forward(self, x_TD: torch.Tensor, modality_T: torch.Tensor,
                ctx: RouteContext = RouteContext(),
                group_T: torch.Tensor | None = None) -> MoEOutput:
        """``group_T``: each token's routing group (GShard's groups, ``routing_groups``).
        In training every group is routed on its own (its own capacity and noise) and the
        auxiliary losses and statistics are those of the whole batch; evaluation routes the
        batch as one group."""
        if group_T is None or not self.training or self.cfg.routing_groups == 1:
            routed = self.route(x_TD, modality_T, ctx)
            return MoEOutput(self.run_experts(x_TD, routed.routing), *routed[1:])
        y_TD = torch.zeros_like(x_TD)
        parts = []
        for g in range(self.cfg.routing_groups):
            (idx,) = torch.nonzero(group_T == g, as_tuple=True)
            routing = self._route(x_TD[idx], modality_T[idx], ctx, g)
            y_TD = y_TD.index_put((idx,), self.run_experts(x_TD[idx], routing))
            parts.append(GroupRouting.of(routing, modality_T[idx]))
        return MoEOutput(y_TD, *_joined(parts, 0, self.cfg))

    def route(self, x_TD: torch.Tensor, modality_T: torch.Tensor,
              ctx: RouteContext = RouteContext(), group: int = 0, share=None) -> "Routed":
        """The routing, auxiliary losses and statistics, without running the experts (a
        router whose workers call the experts themselves routes this way). With ``share``,
        ``x_TD`` is group ``group`` of a batch whose other groups are routed elsewhere:
        ``share(part)`` sends this group's ``GroupRouting`` and returns every group's, in
        group order, and the losses and statistics are those of the whole batch, as
        ``forward`` computes them, with gradients through this group's routing only."""
        routing = self._route(x_TD, modality_T, ctx, group)
        if share is None:
            aux_loss, aux = aux_losses(routing, modality_T, self.cfg)
            return Routed(routing, aux_loss, {k: v.detach() for k, v in aux.items()},
                          RoutingStats.of(routing, modality_T))
        part = GroupRouting.of(routing, modality_T)
        parts = list(share(part.detached()))  # a copy: the list may be another router's too
        parts[group] = part
        return Routed(routing, *_joined(parts, group, self.cfg))

    def run_experts(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Dispatch -> experts -> combine: y_TD."""
        plan = make_plan(routing)
        y_AD = self.experts(dispatch(x_TD, plan), plan.counts_E)
        return combine(y_AD, routing.weight_A, plan)

    def _route(self, x_TD, modality_T, ctx, group: int) -> Routing:
        return route(x_TD, self.gate.w_ED, modality_T, self.cfg, training=self.training,
                     noise_seed=ctx.noise_seed(self.layer_index, group))


class Routed(NamedTuple):
    routing: Routing
    aux_loss: torch.Tensor
    aux: dict[str, torch.Tensor]
    stats: RoutingStats


@dataclass
class GroupRouting:
    """What the whole-batch losses and statistics need of one group's routing: small."""
    routing: Routing  # probs, logits and routed experts; kept assignments for the statistics
    modality_T: torch.Tensor
    stats: RoutingStats

    @staticmethod
    def of(routing: Routing, modality_T: torch.Tensor) -> "GroupRouting":
        return GroupRouting(routing, modality_T, RoutingStats.of(routing, modality_T))

    def detached(self) -> "GroupRouting":
        r = self.routing
        return GroupRouting(replace(r, logits_TE=r.logits_TE.detach(),
                                    probs_TE=r.probs_TE.detach(),
                                    weight_A=r.weight_A.detach()),
                            self.modality_T, self.stats)


def _joined(parts: list[GroupRouting], group: int, cfg: MoEConfig):
    """(aux loss, aux terms, statistics) of grouped routing: the auxiliary losses over every
    group's tokens (in group order), the statistics summed."""
    device = parts[group].routing.probs_TE.device
    whole = replace(parts[group].routing,
                    logits_TE=torch.cat([p.routing.logits_TE.to(device) for p in parts]),
                    probs_TE=torch.cat([p.routing.probs_TE.to(device) for p in parts]),
                    expert_R=torch.cat([p.routing.expert_R.to(device) for p in parts]))
    modality_T = torch.cat([p.modality_T.to(device) for p in parts])
    aux_loss, aux = aux_losses(whole, modality_T, cfg)
    stats = parts[0].stats
    for p in parts[1:]:
        stats = stats + p.stats
    return aux_loss, {k: v.detach() for k, v in aux.items()}, stats


def expert_seed(seed: int, layer_index: int, expert: int) -> int:
    return (seed * 1_000_003 + layer_index * 10_007 + expert + 1) % (2**63)

"""Expert FFNs and the expert backend interface.

An expert backend maps the dispatched rows ``x_AD`` (grouped by expert, ``counts_E`` rows each)
to ``y_AD``. The in-process reference runs every expert here; a distributed backend sends each
expert's slice to the process that owns it. Both are autograd-aware nn.Modules, so the MoE layer
is written once.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


# The FFNs' nonlinearities by name (model.moe.activation; the dense blocks use GELU).
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class FFN(nn.Module):
    """D -> F -> D with GELU (or ``activation``): a dense block's FFN, and each expert (same
    shape, so a MoE layer can replace a dense one at equal active parameters)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"FFN: activation {activation!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_ND)))


def init_expert_(expert: FFN, seed: int) -> None:
    """Initialise from a seed of its own so an expert's weights do not depend on placement."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (expert.fc1, expert.fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)
            lin.bias.zero_()


def run_expert(ffn: FFN, x_ND: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    """One expert on its rows. ``precision`` bfloat16 runs its matmuls under autocast (the
    tensor cores' rate on a GPU) while its weights stay float32; the output comes back in the
    input's dtype, so combining and everything after it stays float32."""
    if precision == "float32":
        return ffn(x_ND)
    with torch.autocast(x_ND.device.type, dtype=getattr(torch, precision)):
        y_ND = ffn(x_ND)
    return y_ND.to(x_ND.dtype)


class ExpertBackend(nn.Module):
    """Interface: ``forward(x_AD, counts_E) -> y_AD`` for one MoE layer's experts."""

    def forward(self, x_AD: torch.Tensor, counts_E: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


class LocalExperts(ExpertBackend):
    """The in-process reference: a readable loop over experts."""

    def __init__(self, num_experts: int, dim: int, hidden: int, precision: str = "float32",
                 activation: str = "gelu"):
        super().__init__()
        self.experts = nn.ModuleList(FFN(dim, hidden, activation) for _ in range(num_experts))
        self.precision = precision

    def forward(self, x_AD: torch.Tensor, counts_E: tuple[int, ...]) -> torch.Tensor:
        pieces = torch.split(x_AD, list(counts_E))
        # An expert with no rows is skipped: it costs nothing and adds no gradient.
        outs = [run_expert(self.experts[e], x, self.precision) if x.shape[0] else x
                for e, x in enumerate(pieces)]
        return torch.cat(outs, dim=0) if outs else x_AD

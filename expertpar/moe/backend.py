"""The backend interface: who builds (and so who runs) each MoE layer.

The model asks its backend for every MoE layer and calls what it gets back as
``layer(x_TD, modality_T, ctx) -> MoEOutput``. The in-process backend returns a plain
``MoELayer``; a distributed backend returns a module whose gate and experts live elsewhere.
"""
from __future__ import annotations

from typing import Protocol

import torch.nn as nn

from ..config import MoEConfig
from .layer import MoELayer


class MoEBackend(Protocol):
    name: str

    def build_layer(self, layer_index: int, dim: int, cfg: MoEConfig, seed: int) -> nn.Module:
        ...


class LocalBackend:
    """The in-process reference: gate and experts are ordinary parameters of the model."""

    name = "local"

    def build_layer(self, layer_index: int, dim: int, cfg: MoEConfig, seed: int) -> nn.Module:
        return MoELayer(dim, cfg, layer_index, seed=seed)

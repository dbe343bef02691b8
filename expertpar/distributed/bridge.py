"""The bridge: a torch autograd Function that hands a MoE layer's tokens to the router actor.

``RayBackend`` gives the model ``RemoteMoE`` layers, called exactly like the in-process
``MoELayer``: ``layer(x_TD, modality_T, ctx) -> MoEOutput``. Forward sends the tokens to the
router and returns its combined output and auxiliary loss; backward sends the output gradient
(and this worker's share of the auxiliary loss gradient) and returns the input gradient.
"""
from __future__ import annotations

import itertools

import ray
import torch
import torch.nn as nn

from ..config import MoEConfig
from ..moe.layer import MoEOutput, RouteContext
from .tensors import from_wire, to_wire


class RayBackend:
    name = "ray"

    def __init__(self, router, *, rank: int = 0, world_size: int = 1):
        self.router = router
        self.rank = rank
        self.world_size = world_size

    def build_layer(self, layer_index: int, dim: int, cfg: MoEConfig, seed: int) -> nn.Module:
        return RemoteMoE(self, layer_index, cfg)


class RemoteMoE(nn.Module):
    """A MoE layer whose gate and experts live in the router and expert actors."""

    def __init__(self, backend: RayBackend, layer_index: int, cfg: MoEConfig):
        super().__init__()
        self.backend = backend
        self.layer_index = layer_index
        self.cfg = cfg
        self._eval_calls = itertools.count()

    def forward(self, x_TD: torch.Tensor, modality_T: torch.Tensor,
                ctx: RouteContext = RouteContext()) -> MoEOutput:
        if self.training:
            # Every worker joins the same training call; the step names it.
            key, rank, size = f"train:{ctx.step}", self.backend.rank, self.backend.world_size
        else:
            # Evaluation runs on one worker alone: a group of one, a fresh name per call.
            key, rank, size = f"eval:{self.backend.rank}:{next(self._eval_calls)}", 0, 1
        box: dict = {}
        y_TD, aux_loss = _BridgeFn.apply(x_TD, modality_T, self, key, rank, size, ctx, box)
        return MoEOutput(y_TD, aux_loss, box["aux"], box["stats"])


class _BridgeFn(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x_TD, modality_T, module: RemoteMoE, key, rank, size, ctx, box):
        router = module.backend.router
        y, aux_loss, aux, stats = ray.get(router.forward.remote(
            key, module.layer_index, rank, size, to_wire(x_TD), to_wire(modality_T),
            module.training, ctx.seed, ctx.step))
        fctx.call = (router, key, module.layer_index, rank, size)
        box["aux"] = {k: torch.tensor(v) for k, v in aux.items()}
        box["stats"] = stats
        return from_wire(y, x_TD.device).to(x_TD.dtype), torch.tensor(aux_loss, device=x_TD.device)

    @staticmethod
    def backward(fctx, dy_TD, d_aux):
        router, key, layer, rank, size = fctx.call
        dx = ray.get(router.backward.remote(key, layer, rank, size, to_wire(dy_TD),
                                            float(d_aux)))
        return from_wire(dx, dy_TD.device).to(dy_TD.dtype), None, None, None, None, None, None, None

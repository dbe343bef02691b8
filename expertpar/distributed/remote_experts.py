"""RemoteExperts: the expert backend whose experts live in ExpertActors.

It plugs into the ordinary ``MoELayer`` inside the router actor, so routing, dispatch, combine
and the auxiliary losses run the very same code as in process. Each call fans out to every actor
owning an expert that got tokens, all at once; experts with no tokens are not called at all.
"""
from __future__ import annotations

import ray
import torch

from ..moe.experts import ExpertBackend
from .tensors import from_wire, to_wire


class RemoteExperts(ExpertBackend):
    def __init__(self, layer: int, actors: list, owner: dict[tuple[int, int], int],
                 count=lambda name, n: None):
        super().__init__()
        self.count = count  # the router's call counter
        self.layer = layer
        self.actors = actors
        self.owner = owner  # (layer, expert) -> actor index
        self.call_key = "?"  # set by the router before each forward: names the cached activations

    def forward(self, x_AD: torch.Tensor, counts_E: tuple[int, ...]) -> torch.Tensor:
        return _RemoteExpertsFn.apply(x_AD, self, tuple(counts_E))

    def _fan_out(self, method: str, key: str, pieces: list[torch.Tensor],
                 **kwargs) -> list[torch.Tensor]:
        per_actor: dict[int, dict[int, object]] = {}
        for expert, piece in enumerate(pieces):
            if piece.shape[0]:
                per_actor.setdefault(self.owner[(self.layer, expert)], {})[expert] = to_wire(piece)
        refs = {a: getattr(self.actors[a], method).remote(key, self.layer, xs, **kwargs)
                for a, xs in per_actor.items()}
        self.count(f"router->expert/{method}", len(refs))
        try:
            results = dict(zip(refs, ray.get(list(refs.values()))))  # concurrent, then gather
        except ray.exceptions.RayActorError as err:
            raise self._which_actor_died(refs, method) from err
        out = []
        for expert, piece in enumerate(pieces):
            if piece.shape[0]:
                out.append(from_wire(results[self.owner[(self.layer, expert)]][expert]))
            else:
                out.append(piece.detach().new_zeros(piece.shape))
        return out


    def _which_actor_died(self, refs: dict, method: str) -> RuntimeError:
        for a, ref in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as err:
                hosted = sorted(e for (l, e), owner in self.owner.items()
                                if owner == a and l == self.layer)
                return RuntimeError(f"expert actor {a} (MoE layer {self.layer}, experts "
                                    f"{hosted}) died during {method}: {type(err).__name__}; "
                                    f"resume from the last checkpoint")
        return RuntimeError(f"an expert actor died during {method} of MoE layer {self.layer}")


class _RemoteExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD, module: RemoteExperts, counts_E):
        # The key names the activations the actors keep; backward must use this call's key.
        ctx.module, ctx.counts, ctx.key = module, counts_E, module.call_key
        pieces = list(torch.split(x_AD, list(counts_E)))
        # Inside forward grad mode is off; whether activations are kept depends on the input.
        outs = module._fan_out("forward", ctx.key, pieces, grad=bool(x_AD.requires_grad))
        return torch.cat(outs) if outs else x_AD.new_zeros(x_AD.shape)

    @staticmethod
    def backward(ctx, dy_AD):
        pieces = list(torch.split(dy_AD.contiguous(), list(ctx.counts)))
        return torch.cat(ctx.module._fan_out("backward", ctx.key, pieces)), None, None

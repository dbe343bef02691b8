"""RemoteExperts: the expert backend whose experts live in ExpertActors.

It plugs into the ordinary ``MoELayer`` inside the router actor, so routing, dispatch, combine
and the auxiliary losses run the very same code as in process. Each call sends every actor
owning an expert that got tokens one message (all its experts' rows in one buffer), all at
once; experts with no tokens are not called at all. Backward also brings back the layer's
expert gradient norms, which the router hands on to the train workers with the input gradient.
"""
from __future__ import annotations

import threading
import time

import torch

from ..moe.experts import ExpertBackend
from .calls import PeerLost, results
from .wire import Links, gpu_bytes


class RemoteExperts(ExpertBackend):
    def __init__(self, layer: int, owner: dict[tuple[int, int], int],
                 links: Links, peers, count=lambda name, n: None,
                 fan_out_lock: threading.Lock | None = None, caller: str = "router"):
        super().__init__()
        self.count = count  # the caller's call counter
        self.caller = caller  # who fans out: the router, or a worker (experts.transport direct)
        self.layer = layer
        self.owner = owner  # (layer, expert) -> actor index
        self.links = links
        self.peers = peers  # () -> every actor's (link address, Peer), in actor order
        # An outbox holds one message at a time: one fan-out at a time per router.
        self.lock = fan_out_lock or threading.Lock()
        self.call_key = "?"  # set by the router before each forward: names the cached activations
        self.norms = torch.zeros(0)  # gradient norms from the last backward

    def forward(self, x_AD: torch.Tensor, counts_E: tuple[int, ...]) -> torch.Tensor:
        return _RemoteExpertsFn.apply(x_AD, self, tuple(counts_E))

    def _fan_out(self, method: str, key: str, pieces: list[torch.Tensor],
                 **kwargs) -> torch.Tensor:
        """Send each actor its experts' pieces, gather every reply, and return the results
        concatenated in expert order (zeros for experts that got no rows)."""
        per_actor: dict[int, list[int]] = {}
        for expert, piece in enumerate(pieces):
            if piece.shape[0]:
                per_actor.setdefault(self.owner[(self.layer, expert)], []).append(expert)
        peers = self.peers()
        with self.lock:
            t0 = time.perf_counter()
            pending, sent, on_gpu = {}, 0, 0
            try:
                for a, experts in per_actor.items():
                    address, peer = peers[a]
                    packet = self.links.outbox(address).pack([pieces[e] for e in experts])
                    sent += packet[1]
                    on_gpu += gpu_bytes(packet)
                    pending[a] = peer.request(method, key, self.layer, packet, tuple(experts),
                                              reply_to=self.links.address, **kwargs)
            except BaseException:
                results(pending)  # read the replies of what went out before the failure
                raise
            finally:
                self.count(f"{self.caller}->expert/{method}", len(pending))
                if self.caller == "worker":  # one fan-out: one round in a row, however wide
                    self.count(f"worker->experts/{method}", 1)
            replies, failed = results(pending)  # they compute at once; every reply is read
            if failed:
                a, err = failed
                if isinstance(err, PeerLost):
                    hosted = sorted(e for (l, e), owner in self.owner.items()
                                    if owner == a and l == self.layer)
                    raise type(err)(f"{err} (MoE layer {self.layer}, experts {hosted})"
                                    ) from err
                raise err
            got: dict[int, torch.Tensor] = {}
            norms, busy = [], 0.0
            for a, experts in per_actor.items():
                packet, seconds = replies[a]
                busy = max(busy, seconds)
                sent += packet[1]
                on_gpu += gpu_bytes(packet)
                tensors = self.links.inbox.unpack(packet)
                if method == "backward":  # the actor's gradient norms come last (on the CPU)
                    norms.append(tensors.pop().to("cpu", copy=True))
                got.update(zip(experts, tensors))
            # One copy out of the reply buffers, which the actors reuse on their next reply.
            out = torch.cat([got[e].to(piece.device) if e in got
                             else piece.detach().new_zeros(piece.shape)
                             for e, piece in enumerate(pieces)]) if pieces else None
            if method == "backward":
                self.norms = torch.cat(norms) if norms else torch.zeros(0)
            self.links.meter.add(sent, time.perf_counter() - t0 - busy, len(pending), on_gpu)
        return out


class _RemoteExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD, module: RemoteExperts, counts_E):
        # The key names the activations the actors keep; backward must use this call's key.
        ctx.module, ctx.counts, ctx.key = module, counts_E, module.call_key
        if x_AD.shape[0] == 0:
            return x_AD.new_zeros(x_AD.shape)
        pieces = list(torch.split(x_AD, list(counts_E)))
        # Inside forward grad mode is off; whether activations are kept depends on the input.
        return module._fan_out("forward", ctx.key, pieces, grad=bool(x_AD.requires_grad))

    @staticmethod
    def backward(ctx, dy_AD):
        if dy_AD.shape[0] == 0:
            ctx.module.norms = torch.zeros(0)
            return dy_AD.new_zeros(dy_AD.shape), None, None
        pieces = list(torch.split(dy_AD.contiguous(), list(ctx.counts)))
        return ctx.module._fan_out("backward", ctx.key, pieces), None, None

"""The bridge: a torch autograd Function that hands a MoE layer's tokens to the router actor.

``RayBackend`` gives the model ``RemoteMoE`` layers, called exactly like the in-process
``MoELayer``: ``layer(x_TD, modality_T, ctx) -> MoEOutput``. Forward sends the tokens to the
router and returns its combined output and auxiliary loss; backward sends the output gradient
(and this worker's share of the auxiliary loss gradient) and returns the input gradient. The
backward reply also carries the layer's gradient norms, which ``RemoteOwner`` (runtime.py)
hands to the step's global clipping without asking the router again.

With ``experts.transport: direct`` the router only routes: forward gets this worker's share
of the plan from it and calls the expert actors from here (``_DirectFn``), so activations go
between this worker and the actors without passing through the router.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import Counter

import ray
import torch
import torch.nn as nn

from ..config import MoEConfig
from ..moe.dispatch import DispatchPlan, combine, dispatch
from ..moe.layer import MoEOutput, RouteContext
from ..moe.stats import RoutingStats
from .calls import peer_for
from .remote_experts import RemoteExperts
from .wire import Links, gpu_bytes


class RayBackend:
    name = "ray"

    def __init__(self, routers, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        """``routers``: the router actor, or the list of them (experts.num_routers): worker
        ``rank`` of ``world_size`` calls the router of its group, as one of the group's
        workers. ``device``: where this worker's activations are (its GPU is advertised to
        the router, so tokens can stay on it when the router shares it)."""
        routers = routers if isinstance(routers, (list, tuple)) else [routers]
        per_router = world_size // len(routers)
        self.router = routers[rank // per_router]
        self.global_rank = rank
        self.rank = rank % per_router  # within the router's group
        self.world_size = per_router
        info = ray.get(self.router.address.remote())
        self.router_address = info["address"]
        self.links = Links(info["shared_memory"], device)
        self.calls_made: Counter = Counter()  # this worker's calls to expert actors (bench)
        # Forward and backward go through a socket to a router (or expert actor) on this node.
        node, serves = self.links.node, info["serves_calls"]
        # The router may wait a deadline for the other workers and another for the expert
        # actors before it answers: the worker waits for both, so the router names the culprit.
        self.timeout_s = info["call_timeout_s"]
        self.router_deadline_s = 2 * self.timeout_s + 30  # every wait on the router
        self.calls = peer_for(self.router, "the router", self.router_address, serves, node,
                              self.router_deadline_s)
        self.transport = info["transport"]
        self.experts: dict[int, RemoteExperts] = {}
        if self.transport == "direct":
            peers = [(address, peer_for(handle, f"expert actor {a}", address, serves, node,
                                        self.timeout_s))
                     for a, (handle, address) in enumerate(zip(info["actors"],
                                                               info["actor_addresses"]))]
            lock = threading.Lock()  # one fan-out at a time through this worker's outboxes
            layers = sorted({layer for layer, _ in info["owner"]})
            self.experts = {L: RemoteExperts(L, info["owner"], self.links,
                                             lambda: peers, self._count, lock, "worker")
                            for L in layers}
        self.stepped: int | None = None  # the last optimizer step sent (see RemoteOwner.step)
        self.norms: dict[str, dict[int, torch.Tensor]] = {}  # call key -> layer -> norms

    def _count(self, name: str, n: int = 1) -> None:
        self.calls_made[name] += n

    def build_layer(self, layer_index: int, dim: int, cfg: MoEConfig, seed: int) -> nn.Module:
        return RemoteMoE(self, layer_index, cfg)

    def round_trip(self, method: str, tensors: list[torch.Tensor], *args, **kwargs):
        """One call to the router: ``tensors`` as one message, the rest as arguments. Returns
        the reply's tensors (views into the router's reply buffer: copy what you keep) and its
        other values, and books the bytes and the seconds not spent in the router."""
        t0 = time.perf_counter()
        packet = self.links.outbox(self.router_address).pack(tensors)
        reply, *rest, busy = self.calls.call(method, *args, packet=packet,
                                             reply_to=self.links.address, **kwargs)
        tensors_back = self.links.inbox.unpack(reply)
        self.links.meter.add(packet[1] + reply[1], time.perf_counter() - t0 - busy,
                             gpu_bytes=gpu_bytes(packet, reply))
        return tensors_back, rest

    def take_norms(self, step: int) -> torch.Tensor | None:
        """The gate and expert gradient norms of training step ``step``, gathered from the
        backward replies (None when no MoE layer ran backward)."""
        per_layer = self.norms.pop(f"train:{step}", None)
        self.norms.clear()  # norms of calls that never reached a step (a parity test's probe)
        if not per_layer:
            return None
        return torch.cat([per_layer[L] for L in sorted(per_layer)])


class RemoteMoE(nn.Module):
    """A MoE layer whose gate and experts live in the router and expert actors."""

    def __init__(self, backend: RayBackend, layer_index: int, cfg: MoEConfig):
        super().__init__()
        self.backend = backend
        self.layer_index = layer_index
        self.cfg = cfg
        self._eval_calls = itertools.count()

    def forward(self, x_TD: torch.Tensor, modality_T: torch.Tensor,
                ctx: RouteContext = RouteContext(), group_T=None) -> MoEOutput:
        # No group_T: this worker's tokens all belong to the group its router routes.
        if self.training:
            # Every worker joins the same training call; the step names it.
            key, rank, size = f"train:{ctx.step}", self.backend.rank, self.backend.world_size
        else:
            # Evaluation runs on one worker alone: a group of one, a fresh name per call.
            key, rank, size = f"eval:{self.backend.rank}:{next(self._eval_calls)}", 0, 1
        box: dict = {}
        fn = _DirectFn if self.backend.transport == "direct" else _BridgeFn
        y_TD, aux_loss = fn.apply(x_TD, modality_T, self, key, rank, size, ctx, box)
        return MoEOutput(y_TD, aux_loss, box["aux"], box["stats"])


class _BridgeFn(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x_TD, modality_T, module: RemoteMoE, key, rank, size, ctx, box):
        b = module.backend
        (y_TD, *stats), (aux_loss, aux, policy) = b.round_trip(
            "forward", [x_TD, modality_T], key, module.layer_index, rank, size,
            training=module.training, seed=ctx.seed, step=ctx.step, after=b.stepped)
        fctx.call = (module, key, rank, size)
        box["aux"] = {k: torch.tensor(v) for k, v in aux.items()}
        box["stats"] = RoutingStats.from_tensors([t.to("cpu", copy=True) for t in stats],
                                                 policy)
        # A copy out of the router's reply buffer, which it reuses on its next reply.
        return y_TD.to(x_TD.device, x_TD.dtype, copy=True), torch.tensor(aux_loss,
                                                                       device=x_TD.device)

    @staticmethod
    def backward(fctx, dy_TD, d_aux):
        module, key, rank, size = fctx.call
        b = module.backend
        (dx_TD, norms), _ = b.round_trip("backward", [dy_TD], key, module.layer_index, rank,
                                         size, d_aux=float(d_aux))
        b.norms.setdefault(key, {})[module.layer_index] = norms.to("cpu", copy=True)
        return (dx_TD.to(dy_TD.device, dy_TD.dtype, copy=True),
                None, None, None, None, None, None, None)


class _DirectFn(torch.autograd.Function):
    """experts.transport direct: the router plans, this worker moves the rows.

    Forward asks the router for this worker's share of the plan (its assignments' tokens,
    their combine weights, rows per expert), then runs dispatch -> expert actors -> combine
    here, with the same functions as the in-process layer, as a small graph of its own.
    Backward runs that graph back (the expert actors' backward included), which gives the
    input gradient through the experts and the combine weights' gradient; the router takes
    the latter back through the gate and returns the input gradient through the gate.
    """

    @staticmethod
    def forward(fctx, x_TD, modality_T, module: RemoteMoE, key, rank, size, ctx, box):
        b = module.backend
        (token_A, weight_A, counts_E, *stats), (aux_loss, aux, policy) = b.round_trip(
            "plan", [x_TD, modality_T], key, module.layer_index, rank, size,
            training=module.training, seed=ctx.seed, step=ctx.step, after=b.stepped)
        plan = DispatchPlan(token_A.to(x_TD.device, copy=True), tuple(counts_E.tolist()),
                            x_TD.shape[0])
        experts = b.experts[module.layer_index]
        # The actors keep activations by this name: unique per worker (they serve them all).
        experts.call_key = f"{key}@w{b.global_rank}"
        with torch.enable_grad():
            x_leaf = x_TD.detach().requires_grad_(module.training)
            w_leaf = weight_A.to(x_TD.device, copy=True).requires_grad_(module.training)
            y_TD = combine(experts(dispatch(x_leaf, plan), plan.counts_E), w_leaf, plan)
        fctx.graph = (x_leaf, w_leaf, y_TD)
        fctx.call = (module, key, rank, size)
        box["aux"] = {k: torch.tensor(v) for k, v in aux.items()}
        box["stats"] = RoutingStats.from_tensors([t.to("cpu", copy=True) for t in stats],
                                                 policy)
        return y_TD.detach(), torch.tensor(aux_loss, device=x_TD.device)

    @staticmethod
    def backward(fctx, dy_TD, d_aux):
        module, key, rank, size = fctx.call
        b = module.backend
        x_leaf, w_leaf, y_TD = fctx.graph
        dx_TD, dw_A = torch.autograd.grad(y_TD, [x_leaf, w_leaf], dy_TD, allow_unused=True)
        dw_A = torch.zeros_like(w_leaf) if dw_A is None else dw_A
        (dx_gate, norms), _ = b.round_trip("gate_backward", [dw_A], key, module.layer_index,
                                           rank, size, d_aux=float(d_aux))
        b.norms.setdefault(key, {})[module.layer_index] = norms.to("cpu", copy=True)
        dx_gate = dx_gate.to(dy_TD.device, dy_TD.dtype, copy=True)
        fctx.graph = None
        return (dx_gate if dx_TD is None else dx_TD + dx_gate,
                None, None, None, None, None, None, None)

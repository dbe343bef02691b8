"""RouterActor: owns the gates, gathers every train worker's tokens, routes them jointly.

One router serves all train workers. For each (call, MoE layer) it waits for the tokens of the
whole group, orders them as one in-process batch would be ordered (all image tokens, then all
text tokens, each in worker order), and runs the ordinary ``MoELayer`` on them with
``RemoteExperts``. Capacity, dropping order, auxiliary losses and statistics are therefore those
of the whole global batch, exactly as in process, whatever the number of workers. Backward
gathers the workers' output gradients the same way and returns each worker its input gradient
together with the layer's gradient norms (gate and experts), so the step needs no extra call.

The optimizer step is a call the workers do not wait for: the router applies it (its gates and
every expert actor) while the workers step their dense part and load the next batch, and any
call that must see the stepped weights names the step it comes after and waits for it here.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import ray
import torch

from ..config import MoEConfig, TrainConfig
from ..moe.layer import GroupRouting, MoELayer, RouteContext
from ..train.checkpoint import read_shards
from ..train.names import ROUTER_FILE, gate_entries
from ..train.owners import ParameterOwner, grad_norms_of
from .calls import (CALL_TIMEOUT_S, CallServer, Peer, PeerLost, PeerStuck, peer_for, results,
                    wait_for)
from .expert_actor import actor_device
from .remote_experts import RemoteExperts
from .wire import Address, Links

@dataclass
class _Gather:
    """Rendezvous of ``size`` workers; the last to arrive computes for all."""
    size: int
    parts: dict[int, tuple] = field(default_factory=dict)
    result: object = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class RouterActor:
    def __init__(self, dim: int, moe: MoEConfig, train: TrainConfig, num_layers: int, seed: int,
                 actors: list, owner: dict[tuple[int, int], int], checkpoint: str | None = None,
                 shared_memory: bool = True, threads: int | None = None,
                 calls: str = "socket", index: int = 0, num_routers: int = 1,
                 lead=None, routers_here: int = 1, transport: str = "router",
                 timeout_s: float = CALL_TIMEOUT_S):
        # The router gates, dispatches and combines every token while the workers wait and the
        # experts idle: it may use the node's cores (router_threads), not Ray's 1-CPU default;
        # routers on one node (routers_here) gate at once, for different groups, and share them.
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // routers_here))
        # On a GPU when it was given a share of one (experts.router_gpus): the gate and the
        # dispatch then run there, and tokens from and to workers and expert actors on the
        # same GPU never leave it.
        self.device = actor_device()
        self.calls: Counter = Counter()  # Ray calls made and received, for `expertpar bench`
        self.links = Links(shared_memory, self.device)
        self.actors = actors
        self.socket_calls = calls == "socket"
        # "direct": workers call the expert actors themselves; the router plans and gates
        self.transport = transport
        # Router ``index`` of ``num_routers`` routes group ``index`` of every training batch;
        # router 0 (``lead`` for the others) is where the groups meet, and it speaks for
        # all routers and every expert actor in the step, gradients and checkpoints.
        self.index, self.num_routers = index, num_routers
        # The deadline of every wait here (experts.call_timeout_s): a stuck peer becomes a
        # loss the job recovers from, not a hang.
        self.timeout_s = timeout_s
        self.lead = lead
        self.others: list = []  # router 0: the other routers (set_routers)
        self._lead_peer: Peer | None = None
        self._peers: list[tuple[Address, Peer]] | None = None
        fan_out_lock = threading.Lock()
        self.experts_owner = owner
        self.layers = [MoELayer(dim, moe, L, seed=seed,
                                experts=RemoteExperts(L, owner, self.links, self.peers,
                                                      self._count, fan_out_lock))
                       .to(self.device) for L in range(num_layers)]
        self.owner = ParameterOwner([e for L, layer in enumerate(self.layers)
                                     for e in gate_entries(L, layer)], train)
        self.lock = threading.Lock()
        self.gathers: dict[tuple, _Gather] = {}
        self.saved: dict[tuple[str, int], tuple] = {}  # forward graph kept for backward
        self.norms: tuple[int, torch.Tensor] | None = None
        self.stepped = threading.Condition()
        self.applied: int | None = None  # the last optimizer step applied everywhere
        self.step_error: BaseException | None = None
        if checkpoint:  # verified by the driver; the router reads only the gates' file
            self.owner.load(read_shards(Path(checkpoint), [ROUTER_FILE], verified=True),
                            where=checkpoint)
        # Workers on this node send forward and backward through a socket (calls.py).
        self.server = (CallServer(self, self.links.id, {"forward", "backward", "share", "plan",
                                                        "gate_backward"})
                       if self.socket_calls else None)

    def set_routers(self, others: list) -> None:
        """Router 0 learns the other routers (it steps them, and zeroes their gradients)."""
        self.others = others

    def address(self) -> dict:
        """What a worker needs to call and send here: the link address, whether shared
        memory is on, the device, whether forward and backward are served on a socket, and
        the transport (with "direct", the expert actors the worker calls itself)."""
        out = {"address": self.links.address, "shared_memory": self.links.shared_memory,
               "device": str(self.device), "serves_calls": self.server is not None,
               "transport": self.transport, "call_timeout_s": self.timeout_s}
        if self.transport == "direct":
            out["actors"] = self.actors
            out["owner"] = self.experts_owner
            out["actor_addresses"] = [a for a, _ in self.peers()]
        return out

    def info(self) -> dict:
        """Where the router runs (node, resources, GPU ids, device) and how it calls each
        expert actor (``socket`` or ``ray``)."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "resources": ctx.get_assigned_resources(),
                "gpu_ids": ray.get_gpu_ids(), "device": str(self.device),
                "placement_group_id": ctx.get_placement_group_id(),
                "group": self.index, "threads": torch.get_num_threads(), "pid": os.getpid(),
                "expert_calls": ["socket" if peer.via_socket else "ray"
                                 for _, peer in self.peers()]}

    def peers(self) -> list[tuple[Address, Peer]]:
        """Every expert actor's link address and the way to call it (its socket when it is on
        this node), in actor order."""
        if self._peers is None:
            peers = []
            for a, (address, serves) in enumerate(ray.get([h.address.remote()
                                                           for h in self.actors])):
                peers.append((address, peer_for(self.actors[a], f"expert actor {a}", address,
                                                self.socket_calls and serves, self.links.node,
                                                self.timeout_s)))
            self._peers = peers
        return self._peers

    def _count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.calls[name] += n

    def call_counts(self, reset: bool = False) -> dict[str, int]:
        with self.lock:
            out = dict(self.calls)
            if reset:
                self.calls.clear()
        return out

    def transport(self) -> dict:
        """Bytes moved to and from the expert actors, and the seconds spent moving them,
        since the last call (for ``expertpar bench``)."""
        return self.links.meter.take()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for _, peer in self._peers or []:
            peer.close()
        self.links.close()

    # ----------------------------------------------------------------- rendezvous

    def _rendezvous(self, tag: tuple, rank: int, size: int, part: tuple, compute):
        with self.lock:
            g = self.gathers.setdefault(tag, _Gather(size))
            if rank in g.parts:
                raise RuntimeError(f"router: rank {rank} sent {tag} twice")
            g.parts[rank] = part
            last = len(g.parts) == g.size
        if last:
            try:
                g.result = compute([g.parts[r] for r in range(size)])
            except BaseException as err:  # every waiting worker must hear of it
                g.error = err
            finally:
                with self.lock:
                    self.gathers.pop(tag, None)
                g.done.set()
        elif not g.done.wait(self.timeout_s) and not (
                # Every worker came, and the last one is computing for all: its calls to the
                # expert actors have deadlines of their own, and their error names the culprit.
                len(g.parts) == g.size and g.done.wait(2 * self.timeout_s)):
            with self.lock:
                self.gathers.pop(tag, None)
            raise PeerStuck(f"router: waited {self.timeout_s:g}s for all {size} workers at {tag}"
                            f"; got ranks {sorted(g.parts)} (experts.call_timeout_s)")
        if g.error is not None:
            # A lost peer stays a loss for every worker waiting here (the job recovers).
            if isinstance(g.error, PeerLost):
                raise PeerLost(str(g.error)) from g.error
            raise RuntimeError(f"router failed at {tag}: {g.error!r}") from g.error
        return g.result[rank]

    def _after(self, step: int | None) -> None:
        """Wait until optimizer step ``step`` is applied (None: nothing to wait for)."""
        if step is None:
            return
        with self.stepped:
            ok = self.stepped.wait_for(lambda: self.step_error is not None or (
                self.applied is not None and self.applied >= step), self.timeout_s)
        if self.step_error is not None:
            kind = PeerLost if isinstance(self.step_error, PeerLost) else RuntimeError
            raise kind(f"router: optimizer step failed: {self.step_error}")
        if not ok:
            raise PeerStuck(f"router: waited {self.timeout_s:g}s for optimizer step "
                               f"{step}; the last applied is {self.applied}")

    # ----------------------------------------------------------------- forward / backward

    def forward(self, key: str, layer: int, rank: int, size: int, packet: tuple,
                training: bool, seed: int, step: int, after: int | None, reply_to: Address):
        """A worker's tokens (x_TD, modality_T) -> (a packet of its y_TD and the routing
        statistics' tensors, aux loss, aux terms, the routing policy, seconds busy here)."""
        return self._tokens_call("forward", self._forward, key, layer, rank, size, packet,
                                 training, RouteContext(seed, step), after, reply_to)

    def _tokens_call(self, name, compute, key, layer, rank, size, packet, training, ctx,
                     after, reply_to):
        """A worker's tokens in, once every worker of the call has sent them: ``compute``
        runs once for all, and this worker gets its reply and the seconds busy here."""
        t0 = time.perf_counter()
        self._count(f"worker->router/{name}")
        self._after(after)
        x_TD, modality_T = [t.to(self.device) for t in self.links.inbox.unpack(packet)]
        reply, aux_loss, aux, policy = self._rendezvous(
            (name, key, layer), rank, size, (x_TD, modality_T, reply_to),
            lambda parts: compute(key, layer, parts, training, ctx))
        return reply, aux_loss, aux, policy, time.perf_counter() - t0

    def _forward(self, key, layer, parts, training, ctx):
        moe = self.layers[layer]
        # The experts keep activations by this name: unique per router (they serve them all).
        moe.experts.call_key = f"{key}@{self.index}"
        x_TD, modality_T, order, routed = self._route(key, layer, parts, training, ctx)
        with torch.set_grad_enabled(training):
            y_TD = moe.run_experts(x_TD, routed.routing)
        sizes = [p[0].shape[0] for p in parts]
        if training:
            self.saved[(key, layer)] = (x_TD, y_TD, routed.aux_loss, order, sizes)
        y_TD = _worker_order(y_TD.detach(), order)
        aux = {k: float(v) for k, v in routed.aux.items()}
        aux_loss = routed.aux_loss.item()
        tensors = routed.stats.tensors()
        return [(self.links.outbox(p[2]).pack([y, *tensors]), aux_loss, aux,
                 routed.stats.policy) for p, y in zip(parts, torch.split(y_TD, sizes))]

    def _route(self, key, layer, parts, training, ctx):
        """The gathered tokens of a call, in in-process order, routed: (x_TD, modality_T,
        order, Routed). With several routers this router routes its group and the losses
        and statistics are the whole batch's (MoELayer.route)."""
        moe = self.layers[layer]
        moe.train(training)
        x_TD, modality_T, order = _in_process_order([p[0] for p in parts],
                                                    [p[1] for p in parts])
        if training:
            # A copy (when gathering did not make one): the worker reuses its buffer before
            # this layer's backward, and the gate keeps its input for the weight gradient.
            x_TD = (x_TD if order is not None or len(parts) > 1 else x_TD.clone())
            x_TD.requires_grad_(True)
        share = None
        if training and self.num_routers > 1:
            def share(part):
                return self._share(("route", key, layer), _to_cpu(part))[0]
        with torch.set_grad_enabled(training):
            routed = moe.route(x_TD, modality_T, ctx, self.index, share)
        return x_TD, modality_T, order, routed

    def backward(self, key: str, layer: int, rank: int, size: int, packet: tuple,
                 d_aux: float, reply_to: Address):
        """A worker's dy_TD -> (a packet of its dx_TD and this layer's gradient norms,
        seconds busy here)."""
        return self._gradient_call("backward", self._backward, key, layer, rank, size, packet,
                                   d_aux, reply_to)

    def _gradient_call(self, name, compute, key, layer, rank, size, packet, d_aux, reply_to):
        """A worker's gradient in (and its share of the aux loss's), once every worker of
        the call has sent theirs: ``compute`` runs once for all, and this worker gets its
        reply and the seconds busy here."""
        t0 = time.perf_counter()
        self._count(f"worker->router/{name}")
        (grad,) = [t.to(self.device) for t in self.links.inbox.unpack(packet)]
        reply = self._rendezvous((name, key, layer), rank, size, (grad, d_aux, reply_to),
                                 lambda parts: compute(key, layer, parts))
        return reply, time.perf_counter() - t0

    def _backward(self, key, layer, parts):
        x_TD, y_TD, aux_loss, order, sizes = self.saved.pop((key, layer))
        dy_TD = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        if order is not None:
            dy_TD = dy_TD[order]
        # Each worker holds aux / W of the global loss, and this router's W / R workers
        # send theirs; the loss is the whole batch's, with a gradient through this group only.
        d_aux = sum(p[1] for p in parts) * self.num_routers
        torch.autograd.backward([y_TD, aux_loss], [dy_TD, aux_loss.new_tensor(d_aux)])
        moe = self.layers[layer]
        norms = self._norms_after_backward(key, layer, lambda: moe.experts.norms)
        dx_TD = _worker_order(x_TD.grad, order)
        return [self.links.outbox(p[2]).pack([dx, norms])
                for p, dx in zip(parts, torch.split(dx_TD, sizes))]

    def _norms_after_backward(self, key: str, layer: int, expert_norms) -> torch.Tensor:
        """The gradient norms a layer's backward reply carries: the gate's and, from
        ``expert_norms()``, its experts' (final: every worker's tokens went into this one
        backward). With several routers they are partial until every router is done, so
        all of them go with each router's last backward of the step."""
        if self.num_routers == 1:
            return torch.cat([grad_norms_of(self.layers[layer].gate.parameters()),
                              expert_norms()])
        if any(k == key for k, _ in self.saved):
            return torch.zeros(0)
        return self._sum_gate_grads(key)

    # ----------------------------------------------------------------- direct transport
    # experts.transport direct: the router routes (gate, policy, capacity, aux losses) and
    # sends each worker its plan and combine weights; the worker sends its rows to the
    # expert actors itself and combines their outputs; backward brings the router the
    # combine weights' gradient, and the router sends back the gate's input gradient.

    def plan(self, key: str, layer: int, rank: int, size: int, packet: tuple,
             training: bool, seed: int, step: int, after: int | None, reply_to: Address):
        """A worker's tokens (x_TD, modality_T) -> (a packet of its assignments' tokens
        token_A, their combine weights weight_A, rows per expert counts_E and the routing
        statistics' tensors; aux loss, aux terms, the routing policy, seconds busy here)."""
        return self._tokens_call("plan", self._plan, key, layer, rank, size, packet, training,
                                 RouteContext(seed, step), after, reply_to)

    def _plan(self, key, layer, parts, training, ctx):
        x_TD, _, order, routed = self._route(key, layer, parts, training, ctx)
        r = routed.routing
        # Each assignment's worker, and its token's index there.
        sizes = [p[0].shape[0] for p in parts]
        source_A = r.token_A if order is None else order[r.token_A]
        starts = torch.tensor([0, *sizes], device=source_A.device).cumsum(0)
        worker_A = torch.bucketize(source_A, starts[1:], right=True)
        picks = [torch.nonzero(worker_A == w, as_tuple=True)[0] for w in range(len(parts))]
        if training:
            self.saved[(key, layer)] = (x_TD, r.weight_A, routed.aux_loss, order, sizes, picks)
        weight_A = r.weight_A.detach()
        stats = routed.stats.tensors()
        E = self.layers[layer].cfg.num_experts
        return [(self.links.outbox(p[2]).pack([
            source_A[pick] - starts[w], weight_A[pick],
            torch.bincount(r.expert_A[pick], minlength=E), *stats]),
            routed.aux_loss.item(), {k: float(v) for k, v in routed.aux.items()},
            routed.stats.policy) for w, (p, pick) in enumerate(zip(parts, picks))]

    def gate_backward(self, key: str, layer: int, rank: int, size: int, packet: tuple,
                      d_aux: float, reply_to: Address):
        """A worker's gradient of its combine weights dweight_A -> (a packet of the gate's
        input gradient dx_TD and the layer's gradient norms, seconds busy here). The worker
        calls it after its experts' backward, so the experts' gradients are complete."""
        return self._gradient_call("gate_backward", self._gate_backward, key, layer, rank, size,
                                   packet, d_aux, reply_to)

    def _gate_backward(self, key, layer, parts):
        x_TD, weight_A, aux_loss, order, sizes, picks = self.saved.pop((key, layer))
        dw_A = torch.zeros_like(weight_A)
        for (dw, _, _), pick in zip(parts, picks):
            dw_A[pick] = dw
        d_aux = sum(p[1] for p in parts) * self.num_routers  # as in _backward
        torch.autograd.backward([weight_A, aux_loss], [dw_A, aux_loss.new_tensor(d_aux)])
        norms = self._norms_after_backward(key, layer, lambda: self._expert_norms(layer))
        dx_TD = _worker_order(x_TD.grad, order)
        return [self.links.outbox(p[2]).pack([dx, norms])
                for p, dx in zip(parts, torch.split(dx_TD, sizes))]

    def _expert_norms(self, layer: int) -> torch.Tensor:
        """Gradient norms of a layer's experts, asked of every actor."""
        self._count("router->expert/layer_grad_norms", len(self.actors))
        pending = {a: peer.request("layer_grad_norms", layer)
                   for a, (_, peer) in enumerate(self.peers())}
        norms, failed = results(pending)
        if failed:
            raise failed[1]
        return torch.cat([norms[a] for a in sorted(norms)])

    # ----------------------------------------------------------------- several routers

    def share(self, tag: tuple, group: int, part):
        """(Router 0) every group's ``part`` for ``tag``, in group order, once all are in.
        For gradients (tag ``("grads", key)``) also the expert actors' gradient norms, asked
        once every router is done with the step's backward."""
        def everyone(parts):
            norms = None
            if tag[0] == "grads":
                self._count("router->expert/grad_norms", len(self.actors))
                norms = torch.cat(wait_for([a.grad_norms.remote(-1) for a in self.actors],
                                           "expert gradient norms", self.timeout_s))
            return [(parts, norms)] * self.num_routers
        return self._rendezvous(tag, group, self.num_routers, part, everyone)

    def _share(self, tag: tuple, part):
        if self.index == 0:
            return self.share(tag, 0, part)
        if self._lead_peer is None:
            lead = wait_for(self.lead.address.remote(), "router 0", self.timeout_s)
            self._lead_peer = peer_for(self.lead, "router 0", lead["address"],
                                       self.socket_calls and lead["serves_calls"],
                                       self.links.node, self.timeout_s)
        self._count("router->router/share")
        return self._lead_peer.call("share", tag, self.index, part)

    def _sum_gate_grads(self, key: str) -> torch.Tensor:
        """After this router's last backward of ``key``: every router's gate gradients summed
        (the same sum, in the same order, everywhere), and the norms of every gate and expert
        gradient, which are final now that every router is done."""
        gates = [p for layer in self.layers for p in layer.gate.parameters()]
        mine = [torch.zeros(p.shape) if p.grad is None else p.grad.detach().cpu() for p in gates]
        every, expert_norms = self._share(("grads", key), mine)
        for p, *grads in zip(gates, *every):
            p.grad = torch.stack(grads).sum(0).to(p.device)
        return torch.cat([grad_norms_of(gates), expert_norms])

    # ----------------------------------------------------------------- the owner calls
    # The router is the parameter owner of the gates and speaks for the expert actors' owners.

    def grad_norms(self, step: int) -> torch.Tensor:
        """Norms of every gate and expert gradient (asked by each worker, computed once)."""
        self._count("worker->router/grad_norms")
        with self.lock:
            if self.norms is not None and self.norms[0] == step:
                return self.norms[1]
            self.calls["router->expert/grad_norms"] += len(self.actors)
            remote = wait_for([a.grad_norms.remote(step) for a in self.actors],
                              "expert gradient norms", self.timeout_s)
            self.norms = (step, torch.cat([self.owner.grad_norms(step), *remote]))
            return self.norms[1]

    def step(self, step: int, lr: float, clip_coef: float) -> None:
        """Optimizer step ``step`` for the gates and every expert actor; calls that name it in
        ``after`` wait until it is applied."""
        self._count("worker->router/step")
        try:
            refs = []
            if self.index == 0:  # router 0 steps the expert actors and the other routers
                self._count("router->expert/step", len(self.actors))
                refs = [a.step.remote(lr, clip_coef) for a in self.actors]
                refs += [r.step.remote(step, lr, clip_coef) for r in self.others]
            self.owner.step(lr, clip_coef)
            self.saved.clear()
            wait_for(refs, f"optimizer step {step} of the expert actors", self.timeout_s)
        except BaseException as err:
            with self.stepped:
                self.step_error = err
                self.stepped.notify_all()
            raise
        with self.stepped:
            self.applied = step
            self.stepped.notify_all()

    def zero_grad(self) -> None:
        """Drop gradients and cached activations here and in every expert actor (a step that
        will not be taken, e.g. after a failed worker)."""
        self.owner.zero_grad()
        self.saved.clear()
        wait_for([h.zero_grad.remote() for h in [*self.actors, *self.others]], "zero_grad",
                 self.timeout_s)

    def grads(self) -> dict[str, torch.Tensor]:
        """Every gate and expert gradient by slot name, for parity tests."""
        out = self.owner.grads()
        for part in wait_for([a.grads.remote() for a in self.actors], "expert gradients",
                             self.timeout_s):
            out.update(part)
        return out

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """The whole MoE side of a checkpoint: router.safetensors and every expert shard."""
        out = self.owner.export()
        for part in wait_for([a.export.remote() for a in self.actors], "expert checkpoint shards",
                             self.timeout_s):
            out.update(part)
        return out


def _to_cpu(part: GroupRouting) -> GroupRouting:
    """A group's routing as it travels to the other routers (small; on the CPU)."""
    r = part.routing
    return GroupRouting(replace(r, **{f.name: getattr(r, f.name).cpu() for f in fields(r)
                                      if isinstance(getattr(r, f.name), torch.Tensor)}),
                        part.modality_T.cpu(), part.stats)


def _in_process_order(xs: list[torch.Tensor], modalities: list[torch.Tensor]):
    """The workers' tokens as one in-process batch orders them: every image token (worker
    order), then every text token. Returns (x_TD, modality_T, order), where order is None when
    the tokens already are in that order (one worker: no gather, no reorder, no copy)."""
    x_TD = torch.cat(xs) if len(xs) > 1 else xs[0]
    modality_T = torch.cat(modalities) if len(modalities) > 1 else modalities[0]
    if modality_T.numel() < 2 or bool((modality_T[1:] >= modality_T[:-1]).all()):
        # The modalities are tiny; a copy keeps routing statistics off the worker's buffer.
        return x_TD, modality_T.clone() if len(modalities) == 1 else modality_T, None
    order = torch.argsort(modality_T, stable=True)
    return x_TD[order], modality_T[order], order


def _worker_order(t_TD: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    if order is None:
        return t_TD
    out = torch.empty_like(t_TD)
    out[order] = t_TD
    return out

"""RouterActor: owns the gates, gathers every train worker's tokens, routes them jointly.

One router serves all train workers. For each (call, MoE layer) it waits for the tokens of the
whole group, orders them as one in-process batch would be ordered (all image tokens, then all
text tokens, each in worker order), and runs the ordinary ``MoELayer`` on them with
``RemoteExperts``. Capacity, dropping order, auxiliary losses and statistics are therefore those
of the whole global batch, exactly as in process, whatever the number of workers. Backward
gathers the workers' output gradients the same way and returns each worker its input gradient.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from ..config import MoEConfig, TrainConfig
from ..moe.layer import MoELayer, RouteContext
from ..train.checkpoint import read_shards
from ..train.names import ROUTER_FILE, gate_entries
from ..train.owners import ParameterOwner
from .remote_experts import RemoteExperts
from .tensors import from_wire, to_wire

GATHER_TIMEOUT_S = 600.0


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
                 actors: list, owner: dict[tuple[int, int], int], checkpoint: str | None = None):
        torch.set_num_threads(1)
        self.calls: Counter = Counter()  # Ray calls made and received, for `expertpar bench`
        self.layers = [MoELayer(dim, moe, L, seed=seed,
                                experts=RemoteExperts(L, actors, owner, self._count))
                       for L in range(num_layers)]
        self.actors = actors
        self.owner = ParameterOwner([e for L, layer in enumerate(self.layers)
                                     for e in gate_entries(L, layer)], train)
        self.lock = threading.Lock()
        self.gathers: dict[tuple, _Gather] = {}
        self.saved: dict[tuple[str, int], tuple] = {}  # forward graph kept for backward
        self.norms: tuple[int, torch.Tensor] | None = None
        if checkpoint:  # verified by the driver; the router reads only the gates' file
            self.owner.load(read_shards(Path(checkpoint), [ROUTER_FILE], verified=True),
                            where=checkpoint)

    def _count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.calls[name] += n

    def call_counts(self, reset: bool = False) -> dict[str, int]:
        with self.lock:
            out = dict(self.calls)
            if reset:
                self.calls.clear()
        return out

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
        elif not g.done.wait(GATHER_TIMEOUT_S):
            with self.lock:
                self.gathers.pop(tag, None)
            raise TimeoutError(f"router: waited {GATHER_TIMEOUT_S:.0f}s for all {size} workers "
                               f"at {tag}; got ranks {sorted(g.parts)}")
        if g.error is not None:
            raise RuntimeError(f"router failed at {tag}: {g.error!r}") from g.error
        return g.result[rank]

    # ----------------------------------------------------------------- forward / backward

    def forward(self, key: str, layer: int, rank: int, size: int, x_TD: np.ndarray,
                modality_T: np.ndarray, training: bool, seed: int, step: int):
        self._count("worker->router/forward")
        return self._rendezvous(("fwd", key, layer), rank, size, (x_TD, modality_T),
                                lambda parts: self._forward(key, layer, parts, training,
                                                            RouteContext(seed, step)))

    def _forward(self, key, layer, parts, training, ctx):
        moe = self.layers[layer]
        moe.train(training)
        moe.experts.call_key = key
        x_TD = torch.cat([from_wire(x) for x, _ in parts])
        modality_T = torch.cat([from_wire(m) for _, m in parts])
        # In-process token order: every image token (worker order), then every text token.
        order = torch.argsort(modality_T, stable=True)
        x_TD, modality_T = x_TD[order], modality_T[order]
        if training:
            x_TD.requires_grad_(True)
        with torch.set_grad_enabled(training):
            out = moe(x_TD, modality_T, ctx)
        if training:
            sizes = [x.shape[0] for x, _ in parts]  # not the arrays: they pin shared memory
            self.saved[(key, layer)] = (x_TD, out.y_TD, out.aux_loss, order, sizes)
        y_TD = torch.empty_like(out.y_TD)
        y_TD[order] = out.y_TD.detach()  # back to the workers' own order
        aux = {k: float(v) for k, v in out.aux.items()}
        stats = out.stats
        results, start = [], 0
        for x_part, _ in parts:
            n = x_part.shape[0]
            results.append((to_wire(y_TD[start:start + n]), out.aux_loss.item(), aux, stats))
            start += n
        return results

    def backward(self, key: str, layer: int, rank: int, size: int, dy_TD: np.ndarray,
                 d_aux: float):
        self._count("worker->router/backward")
        return self._rendezvous(("bwd", key, layer), rank, size, (dy_TD, d_aux),
                                lambda parts: self._backward(key, layer, parts))

    def _backward(self, key, layer, parts):
        x_TD, y_TD, aux_loss, order, sizes = self.saved.pop((key, layer))
        dy_TD = torch.cat([from_wire(dy) for dy, _ in parts])[order]
        d_aux = sum(d for _, d in parts)  # each worker holds aux / W of the global loss
        torch.autograd.backward([y_TD, aux_loss], [dy_TD, torch.tensor(d_aux)])
        dx_TD = torch.empty_like(x_TD)
        dx_TD[order] = x_TD.grad
        return [to_wire(part) for part in torch.split(dx_TD, sizes)]

    # ----------------------------------------------------------------- the owner calls
    # The router is the parameter owner of the gates and speaks for the expert actors' owners.

    def grad_norms(self, step: int) -> torch.Tensor:
        """Norms of every gate and expert gradient (asked by each worker, computed once)."""
        self._count("worker->router/grad_norms")
        with self.lock:
            if self.norms is not None and self.norms[0] == step:
                return self.norms[1]
            self.calls["router->expert/grad_norms"] += len(self.actors)
            remote = ray.get([a.grad_norms.remote(step) for a in self.actors])
            self.norms = (step, torch.cat([self.owner.grad_norms(step), *remote]))
            return self.norms[1]

    def step(self, lr: float, clip_coef: float) -> None:
        self._count("worker->router/step")
        self._count("router->expert/step", len(self.actors))
        refs = [a.step.remote(lr, clip_coef) for a in self.actors]
        self.owner.step(lr, clip_coef)
        self.saved.clear()
        ray.get(refs)

    def zero_grad(self) -> None:
        """Drop gradients and cached activations here and in every expert actor (a step that
        will not be taken, e.g. after a failed worker)."""
        self.owner.zero_grad()
        self.saved.clear()
        ray.get([a.zero_grad.remote() for a in self.actors])

    def grads(self) -> dict[str, torch.Tensor]:
        """Every gate and expert gradient by slot name, for parity tests."""
        out = self.owner.grads()
        for part in ray.get([a.grads.remote() for a in self.actors]):
            out.update(part)
        return out

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """The whole MoE side of a checkpoint: router.safetensors and every expert shard."""
        out = self.owner.export()
        for part in ray.get([a.export.remote() for a in self.actors]):
            out.update(part)
        return out

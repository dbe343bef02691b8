"""ExpertActor: owns some (MoE layer, expert) FFNs, their gradients and their AdamW state.

One call per layer and direction carries all of this actor's experts' rows in one buffer
(wire.py). Forward keeps each expert's input and output (keyed by call and layer) so backward
needs no recomputation; backward returns the input gradients and the gradient norms of this
layer's experts, which are final then: the router gathers every train worker's tokens into
the one call, so parameter gradients accumulate here without an all-reduce. The router tells
the actor when to step.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from ..config import MoEConfig, TrainConfig
from ..moe.experts import FFN, init_expert_, run_expert
from ..moe.layer import expert_seed
from ..train.checkpoint import read_shards
from ..train.names import expert_entries, expert_file
from ..train.owners import ParameterOwner, grad_norms_of
from .calls import CallServer
from .wire import Address, Links

Shard = tuple[int, int]


def actor_device() -> torch.device:
    """CUDA only when Ray gave this actor a GPU: Ray 2.60 no longer hides a node's GPUs from
    an actor that asked for none, and such an actor must not land on GPU 0 unasked."""
    import ray
    # A logical GPU (a test cluster's, or a node without CUDA) leaves the actor on the CPU.
    use = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    return torch.device("cuda") if use else torch.device("cpu")


class ExpertActor:
    def __init__(self, shards: list[Shard], dim: int, moe: MoEConfig, train: TrainConfig,
                 seed: int, checkpoint: str | None = None, shared_memory: bool = True,
                 serve_calls: bool = True):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = actor_device()
        self.precision = moe.expert_precision
        self.experts: dict[Shard, FFN] = {}
        for layer, expert in shards:
            ffn = FFN(dim, moe.expert_hidden, moe.activation)
            init_expert_(ffn, expert_seed(seed, layer, expert))
            self.experts[(layer, expert)] = ffn.to(self.device)
        self.owner = ParameterOwner([e for (L, x), ffn in self.experts.items()
                                     for e in expert_entries(L, x, ffn)], train)
        self.cache: dict[tuple[str, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.links = Links(shared_memory, self.device)
        if checkpoint:
            # The driver verified the checkpoint; each actor reads only its own shards.
            files = [expert_file(L, x) for L, x in self.experts]
            self.owner.load(read_shards(Path(checkpoint), files, verified=True),
                            where=checkpoint)
        # forward and backward also come through a socket (calls.py), on its own thread, beside
        # the step and checkpoint calls that come through Ray: one lock keeps them apart
        # (reentrant: backward takes its layer's gradient norms while holding it).
        self.lock = threading.RLock()
        self.server = (CallServer(self, self.links.id, {"forward", "backward",
                                                        "layer_grad_norms"})
                       if serve_calls else None)

    def info(self) -> dict:
        import ray
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "shards": sorted(self.experts),
                "resources": ctx.get_assigned_resources(), "gpu_ids": ray.get_gpu_ids(),
                "device": str(self.device), "precision": self.precision, "pid": os.getpid(),
                "cpus": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def address(self) -> tuple[Address, bool]:
        """(link address, whether forward and backward are served on a socket)."""
        return self.links.address, self.server is not None

    def set_threads(self, n: int) -> int:
        torch.set_num_threads(max(1, n))
        return torch.get_num_threads()

    def forward(self, key: str, layer: int, packet: tuple, experts: tuple[int, ...],
                grad: bool, reply_to: Address) -> tuple[tuple, float]:
        """Rows of ``experts`` (one tensor each) -> their outputs, and the seconds computed."""
        with self.lock:
            return self._forward(key, layer, packet, experts, grad, reply_to)

    def _forward(self, key, layer, packet, experts, grad, reply_to):
        t0 = time.perf_counter()
        xs = self.links.inbox.unpack(packet)
        saved = self.cache.setdefault((key, layer), {}) if grad else None
        ys = []
        for expert, x in zip(experts, xs):
            ffn = self.experts[(layer, expert)]
            if grad:
                # A copy: the sender reuses its buffer, and fc1 keeps its input for backward.
                x_ND = x.to(self.device, copy=True).requires_grad_(True)
                y_ND = run_expert(ffn, x_ND, self.precision)
                saved[expert] = (x_ND, y_ND)
            else:
                with torch.no_grad():
                    y_ND = run_expert(ffn, x.to(self.device), self.precision)
            ys.append(y_ND.detach())
        busy = time.perf_counter() - t0
        return self.links.outbox(reply_to).pack(ys), busy

    def backward(self, key: str, layer: int, packet: tuple, experts: tuple[int, ...],
                 reply_to: Address) -> tuple[tuple, float]:
        """Output gradients -> (input gradients and, last, this layer's expert gradient
        norms; the seconds computed)."""
        with self.lock:
            return self._backward(key, layer, packet, experts, reply_to)

    def _backward(self, key, layer, packet, experts, reply_to):
        t0 = time.perf_counter()
        saved = self.cache.pop((key, layer))
        dxs = []
        for expert, dy in zip(experts, self.links.inbox.unpack(packet)):
            x_ND, y_ND = saved[expert]
            y_ND.backward(dy.to(self.device))  # accumulates into the expert's .grad
            dxs.append(x_ND.grad)
        norms = self.layer_grad_norms(layer)
        busy = time.perf_counter() - t0
        return self.links.outbox(reply_to).pack([*dxs, norms]), busy

    def layer_grad_norms(self, layer: int) -> torch.Tensor:
        """Per-parameter gradient norms of this layer's experts here (final after every
        backward of the step), in the owner's order."""
        with self.lock:
            return grad_norms_of(p for (L, _), ffn in self.experts.items() if L == layer
                                 for p in ffn.parameters())

    # The parameter-owner calls, forwarded (an actor's methods are what Ray can call).

    def grad_norms(self, step: int) -> torch.Tensor:
        with self.lock:
            return self.owner.grad_norms(step)

    def step(self, lr: float, clip_coef: float) -> None:
        with self.lock:
            self.owner.step(lr, clip_coef)
            self.cache.clear()  # activations of an abandoned call never outlive a step

    def step_as(self, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float) -> bool:
        """A drop-in layer's step (sparse_moe.py): AdamW with the hyperparameters of the
        user's optimizer group that holds the layer's gate, weight decay on every expert
        parameter as torch's AdamW decays a group (the trainer's ``step`` decays matrices
        only, with the run's betas). Gradients that are not finite (those of a step that a
        ``GradScaler`` skipped, which never reaches here, add to the next) are dropped
        without a step: False."""
        with self.lock:
            self.cache.clear()
            if not bool(torch.isfinite(self.owner.grad_norms()).all()):
                self.owner.skip()
                return False
            for group in self.owner.optimizer.param_groups:
                group.update(betas=tuple(betas), eps=eps, weight_decay=weight_decay)
            self.owner.step(lr, 1.0)
            return True

    def load(self, shards: dict[str, dict[str, torch.Tensor]], where: str) -> None:
        """Parameters of this actor's experts from ``shards`` (checkpoint layout), optimizer
        state untouched: a drop-in layer's ``load_state_dict``."""
        with self.lock:
            self.owner.load({f: {k: t.to(self.device) for k, t in tensors.items()}
                             for f, tensors in shards.items()}, where=where,
                            optimizer_state=False)

    def zero_grad(self) -> None:
        with self.lock:
            self.owner.zero_grad()
            self.cache.clear()

    def grads(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return self.owner.grads()

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        with self.lock:
            return self.owner.export()

    def close(self) -> None:
        """Stop serving calls and release the shared buffers (before the actor is killed)."""
        if self.server is not None:
            self.server.close()
        self.links.close()

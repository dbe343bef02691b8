"""ExpertActor: owns some (MoE layer, expert) FFNs, their gradients and their AdamW state.

Forward caches each expert's input and output (keyed by call and layer) so backward needs no
recomputation; parameter gradients accumulate here across every train worker's tokens, so
experts need no all-reduce. The router tells the actor when to step.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..config import MoEConfig, TrainConfig
from ..moe.experts import FFN, init_expert_
from ..moe.layer import expert_seed
from ..train.checkpoint import read_shards
from ..train.names import expert_entries, expert_file
from ..train.owners import ParameterOwner
from .tensors import from_wire, to_wire

Shard = tuple[int, int]


class ExpertActor:
    def __init__(self, shards: list[Shard], dim: int, moe: MoEConfig, train: TrainConfig,
                 seed: int, checkpoint: str | None = None):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.experts: dict[Shard, FFN] = {}
        for layer, expert in shards:
            ffn = FFN(dim, moe.expert_hidden)
            init_expert_(ffn, expert_seed(seed, layer, expert))
            self.experts[(layer, expert)] = ffn.to(self.device)
        self.owner = ParameterOwner([e for (L, x), ffn in self.experts.items()
                                     for e in expert_entries(L, x, ffn)], train)
        self.cache: dict[tuple[str, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        if checkpoint:
            # The driver verified the checkpoint; each actor reads only its own shards.
            files = [expert_file(L, x) for L, x in self.experts]
            self.owner.load(read_shards(Path(checkpoint), files, verified=True),
                            where=checkpoint)

    def info(self) -> dict:
        import ray
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "shards": sorted(self.experts),
                "resources": ctx.get_assigned_resources(), "gpu_ids": ray.get_gpu_ids(),
                "device": str(self.device), "pid": os.getpid()}

    def forward(self, key: str, layer: int, xs: dict[int, np.ndarray],
                grad: bool) -> dict[int, np.ndarray]:
        out = {}
        saved = self.cache.setdefault((key, layer), {}) if grad else None
        for expert, x in xs.items():
            x_ND = from_wire(x, self.device).requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y_ND = self.experts[(layer, expert)](x_ND)
            if grad:
                saved[expert] = (x_ND, y_ND)
            out[expert] = to_wire(y_ND)
        return out

    def backward(self, key: str, layer: int, dys: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        saved = self.cache.pop((key, layer))
        out = {}
        for expert, dy in dys.items():
            x_ND, y_ND = saved[expert]
            y_ND.backward(from_wire(dy, self.device))  # accumulates into the expert's .grad
            out[expert] = to_wire(x_ND.grad)
        return out

    # The parameter-owner calls, forwarded (an actor's methods are what Ray can call).

    def grad_norms(self, step: int) -> torch.Tensor:
        return self.owner.grad_norms(step)

    def step(self, lr: float, clip_coef: float) -> None:
        self.owner.step(lr, clip_coef)
        self.cache.clear()  # activations of an abandoned call never outlive a step

    def zero_grad(self) -> None:
        self.owner.zero_grad()
        self.cache.clear()

    def grads(self) -> dict[str, torch.Tensor]:
        return self.owner.grads()

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.owner.export()

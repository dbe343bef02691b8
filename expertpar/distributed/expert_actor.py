"""ExpertActor: owns some (MoE layer, expert) FFNs, their gradients and their AdamW state.

Forward caches each expert's input and output (keyed by call and layer) so backward needs no
recomputation; parameter gradients accumulate here across every train worker's tokens, so
experts need no all-reduce. The router tells the actor when to step.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..config import MoEConfig, TrainConfig
from ..moe.experts import FFN, init_expert_
from ..moe.layer import expert_seed
from ..train.checkpoint import Slot, export_shards, import_shards
from ..train.optim import build_optimizer, clipped_step
from .tensors import from_wire, to_wire

Shard = tuple[int, int]


def shard_file(layer: int, expert: int) -> str:
    """The checkpoint shard of one expert (same name as the in-process checkpoint)."""
    return f"experts/L{layer}_E{expert}.safetensors"


class ExpertActor:
    def __init__(self, shards: list[Shard], dim: int, moe: MoEConfig, train: TrainConfig,
                 seed: int, state: dict[str, dict[str, torch.Tensor]] | None = None):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.experts: dict[Shard, FFN] = {}
        for layer, expert in shards:
            ffn = FFN(dim, moe.expert_hidden)
            init_expert_(ffn, expert_seed(seed, layer, expert))
            self.experts[(layer, expert)] = ffn.to(self.device)
        self.entries = [(Slot(shard_file(*s), n), p) for s, ffn in self.experts.items()
                        for n, p in ffn.named_parameters()]
        self.optimizer = build_optimizer([(slot.key, p) for slot, p in self.entries], train)
        self.cache: dict[tuple[str, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        if state:
            self.load_state(state)

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

    def grad_norms(self) -> list[tuple[str, float]]:
        return [(f"{slot.file}:{slot.key}", float(torch.linalg.vector_norm(p.grad)))
                for slot, p in self.entries if p.grad is not None]

    def step(self, lr: float, clip_coef: float) -> None:
        clipped_step(self.optimizer, lr, clip_coef)
        self.cache.clear()  # activations of an abandoned call never outlive a step

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.cache.clear()

    def grads(self) -> dict[str, np.ndarray]:
        """Gradients by checkpoint name (file:key), for parity tests."""
        return {f"{slot.file}:{slot.key}": to_wire(p.grad) for slot, p in self.entries
                if p.grad is not None}

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Checkpoint shards of this actor's experts, with their AdamW state."""
        return export_shards(self.entries, self.optimizer)

    def load_state(self, shards: dict[str, dict[str, torch.Tensor]]) -> None:
        import_shards(self.entries, shards, self.optimizer, where="expert actor")

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
from ..moe.experts import ExpertFFN, init_expert_
from ..moe.layer import expert_seed
from ..train.checkpoint import adam_state
from ..train.optim import build_optimizer, set_lr
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
        self.experts: dict[Shard, ExpertFFN] = {}
        for layer, expert in shards:
            ffn = ExpertFFN(dim, moe.expert_hidden)
            init_expert_(ffn, expert_seed(seed, layer, expert))
            self.experts[(layer, expert)] = ffn.to(self.device)
        self.named = [(f"{shard_file(*s)}:{n}", p) for s, ffn in self.experts.items()
                      for n, p in ffn.named_parameters()]
        self.optimizer = build_optimizer(
            [(n.split(":", 1)[1], p) for n, p in self.named], train)
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
        return [(n, float(torch.linalg.vector_norm(p.grad))) for n, p in self.named
                if p.grad is not None]

    def step(self, lr: float, clip_coef: float) -> None:
        for _, p in self.named:
            if p.grad is not None:
                p.grad.mul_(clip_coef)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.cache.clear()  # activations of an abandoned call never outlive a step

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.cache.clear()

    def grads(self) -> dict[str, np.ndarray]:
        """Gradients by checkpoint name (file:key), for parity tests."""
        return {n: to_wire(p.grad) for n, p in self.named if p.grad is not None}

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Checkpoint shards of this actor's experts, with their AdamW state."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self.named:
            file, key = name.split(":", 1)
            shard = out.setdefault(file, {})
            shard[key] = p.detach().cpu().clone()
            for k, v in self.optimizer.state.get(p, {}).items():
                shard[f"{key}::{k}"] = torch.as_tensor(v).detach().cpu().clone()
        return out

    def load_state(self, shards: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, p in self.named:
            file, key = name.split(":", 1)
            tensors = shards.get(file)
            if tensors is None or key not in tensors:
                raise KeyError(f"checkpoint has no '{key}' in {file}")
            with torch.no_grad():
                p.copy_(tensors[key].to(p.device))
            if f"{key}::exp_avg" in tensors:
                self.optimizer.state[p] = adam_state(tensors, key, p.device)

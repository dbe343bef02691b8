"""Parameter owners: every parameter has exactly one process that steps it.

The dense model in each train worker (or the whole model in process), the gates in the router
actor and the experts in each expert actor are all a ``ParameterOwner``: a set of named
parameters with their AdamW state, which can report its gradient norms, take a clipped step,
drop its gradients, and write and read its part of a checkpoint. Clipping is global: the step
that computes the clip coefficient asks every owner for its norms first (train/step.py).
"""
from __future__ import annotations

from typing import Iterable, Protocol

import torch

from ..config import TrainConfig
from .names import Slot
from .optim import build_optimizer, set_lr

Shards = dict[str, dict[str, torch.Tensor]]  # {shard file: {tensor key: tensor}}
OPT_KEYS = ("exp_avg", "exp_avg_sq", "step")


class CheckpointError(RuntimeError):
    pass


class Owner(Protocol):
    """What the training step needs of a parameter owner, local or behind an actor."""

    def grad_norms(self, step: int) -> torch.Tensor:  # per-parameter L2 norms, float32, CPU
        ...

    def step(self, lr: float, clip_coef: float) -> None:  # scale grads, step, clear grads
        ...

    def zero_grad(self) -> None:
        ...

    def skip(self) -> None:  # drop this step's gradients: no update, no optimizer state change
        ...

    def export(self) -> Shards:  # parameters, optimizer state and buffers by checkpoint slot
        ...


class ParameterOwner:
    def __init__(self, entries: Iterable[tuple[Slot, torch.nn.Parameter]], train: TrainConfig,
                 buffers: Iterable[tuple[Slot, torch.Tensor]] = ()):
        self.entries = [(slot, p) for slot, p in entries if p.requires_grad]
        self.buffers = list(buffers)
        self.optimizer = build_optimizer([(slot.key, p) for slot, p in self.entries], train)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.entries]

    # ----------------------------------------------------------------- the step

    def grad_norms(self, step: int = -1) -> torch.Tensor:
        return grad_norms_of(self.parameters)

    def step(self, lr: float, clip_coef: float) -> None:
        """Scale every gradient by the global clip coefficient, step at ``lr``, clear."""
        for _, p in self.entries:
            if p.grad is not None:
                p.grad.mul_(clip_coef)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.zero_grad()

    def grads(self) -> dict[str, torch.Tensor]:
        """Gradients by slot name ("file:key"), for parity tests."""
        return {str(slot): p.grad.detach().cpu() for slot, p in self.entries
                if p.grad is not None}

    # ----------------------------------------------------------------- checkpoint part

    def export(self) -> Shards:
        shards: Shards = {}
        for slot, p in self.entries:
            shard = shards.setdefault(slot.file, {})
            shard[slot.key] = p.detach().cpu().contiguous()
            for k, v in self.optimizer.state.get(p, {}).items():
                shard[f"{slot.key}::{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        for slot, b in self.buffers:
            shards.setdefault(slot.file, {})[slot.key] = b.detach().cpu().contiguous()
        return shards

    def load(self, shards: Shards, *, where: str, optimizer_state: bool = True) -> None:
        """Parameters, buffers and (when saved and wanted) AdamW state back from ``shards``."""
        for slot, t in [*self.entries, *self.buffers]:
            value = _find(shards, slot, where)
            if value.shape != t.shape:
                raise CheckpointError(f"checkpoint {where}: {slot} has shape "
                                      f"{tuple(value.shape)}, the model expects {tuple(t.shape)}")
            with torch.no_grad():
                t.copy_(value)
        if not optimizer_state:
            return
        for slot, p in self.entries:
            tensors = shards[slot.file]
            if f"{slot.key}::exp_avg" in tensors:
                # Moments beside the parameter; the step count stays on the CPU, where torch's
                # non-capturable AdamW keeps it.
                self.optimizer.state[p] = {
                    "exp_avg": tensors[f"{slot.key}::exp_avg"].clone().to(p.device),
                    "exp_avg_sq": tensors[f"{slot.key}::exp_avg_sq"].clone().to(p.device),
                    "step": tensors[f"{slot.key}::step"].clone()}


def grad_norms_of(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Per-parameter L2 norms of the gradients there are (float32, CPU), in order."""
    norms = [torch.linalg.vector_norm(p.grad).float().cpu() for p in parameters
             if p.requires_grad and p.grad is not None]
    return torch.stack(norms) if norms else torch.zeros(0)


def _find(shards: Shards, slot: Slot, where: str) -> torch.Tensor:
    tensors = shards.get(slot.file)
    if tensors is None or slot.key not in tensors:
        raise CheckpointError(f"checkpoint {where} has no '{slot.key}' in {slot.file}: "
                              f"was it written by another model config?")
    return tensors[slot.key]

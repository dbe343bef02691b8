"""Checkpoint entry names: the one place that says where a parameter lives in a checkpoint.

A checkpoint entry is (shard file, tensor key). Names say what a parameter *is* — a dense
parameter, the gate of MoE layer L, expert e of layer L — never which process holds it, so a run
resumes with any placement of experts and any number of workers. The in-process model, the router
actor and the expert actors all name their parameters through these functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch.nn as nn

DENSE_FILE = "dense.safetensors"
ROUTER_FILE = "router.safetensors"
RNG_FILE = "rng.safetensors"
BUFFER_PREFIX = "buffer::"


@dataclass(frozen=True)
class Slot:
    file: str  # shard file, relative to the checkpoint directory
    key: str  # tensor name inside it

    def __str__(self) -> str:
        return f"{self.file}:{self.key}"


def expert_file(layer: int, expert: int) -> str:
    return f"experts/L{layer}_E{expert}.safetensors"


def dense_slot(name: str) -> Slot:
    return Slot(DENSE_FILE, name)


def gate_slot(layer: int, name: str) -> Slot:
    """``name`` is the parameter's name inside the MoE layer, e.g. ``gate.w_ED``."""
    return Slot(ROUTER_FILE, f"moe{layer}.{name}")


def expert_slot(layer: int, expert: int, name: str) -> Slot:
    """``name`` is the parameter's name inside the expert FFN, e.g. ``fc1.weight``."""
    return Slot(expert_file(layer, expert), name)


def gate_entries(layer: int, moe_layer: nn.Module) -> Iterator[tuple[Slot, nn.Parameter]]:
    for name, p in moe_layer.gate.named_parameters(prefix="gate"):
        yield gate_slot(layer, name), p


def expert_entries(layer: int, expert: int,
                   ffn: nn.Module) -> Iterator[tuple[Slot, nn.Parameter]]:
    for name, p in ffn.named_parameters():
        yield expert_slot(layer, expert, name), p


def model_entries(model: nn.Module) -> list[tuple[Slot, nn.Parameter]]:
    """Every parameter of ``model`` with its slot: gates and in-process experts by (layer,
    expert), everything else dense. A model whose MoE layers live elsewhere has dense ones only."""
    named: dict[int, Slot] = {}
    for _, layer in model.moe_layers():
        L = layer.layer_index
        for slot, p in gate_entries(L, layer) if hasattr(layer, "gate") else ():
            named[id(p)] = slot
        # In-process experts are a ModuleList; a remote layer has neither gate nor experts here.
        for e, ffn in enumerate(getattr(getattr(layer, "experts", None), "experts", ())):
            for slot, p in expert_entries(L, e, ffn):
                named[id(p)] = slot
    return [(named.get(id(p), dense_slot(name)), p) for name, p in model.named_parameters()]


def model_buffers(model: nn.Module) -> list[tuple[Slot, object]]:
    """Buffers (BatchNorm running statistics of the CNN stem) are dense model state too."""
    return [(dense_slot(BUFFER_PREFIX + name), b) for name, b in model.named_buffers()]

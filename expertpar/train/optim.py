"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule.

Every parameter owner (train/owners.py: the dense model, the router actor, each expert actor)
builds its optimizer with ``build_optimizer`` and the same rule for weight decay, so ownership
does not change the update.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..config import TrainConfig


def wants_decay(name: str, p: torch.Tensor) -> bool:
    # Norm gains, biases, embeddings and the logit scale are not decayed (CLIP, nanoGPT).
    no_decay = ("pos", "embed", "logit_scale", "norm")
    return p.ndim >= 2 and not any(part in name for part in no_decay)


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                    cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if wants_decay(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the per-parameter loop gives bit-identical updates whoever owns a parameter.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr at step warmup_steps - 1, then cosine down to lr * min_lr_ratio,
    reached at the last step (steps - 1)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    peak = max(cfg.warmup_steps - 1, 0)  # the cosine starts where warmup peaked
    progress = min(1.0, (step - peak) / max(1, cfg.steps - 1 - peak))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

"""The one place a training batch is built, for the in-process loop and the Ray Data pipeline.

Shapes: B = samples in this worker's batch, C/H/W = image channels/height/width, L = context
length (tokens per caption).

A global step's sample indices come from `batch_indices` (a pure function of n, batch size,
seed and step); worker `rank` of `world` takes its contiguous slice. Images are augmented with
`combine_seed(seed, step)` per batch, so sample i of step s always looks the same whichever
worker, process or path (in-process or Ray) builds it, and a resumed run repeats the batches.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .dataset import batch_indices, combine_seed
from .images import Transform, make_transform
from .tokenizer import encode_captions


class BatchSource(Protocol):
    """What a batch is read from: a SampleIndex (or the in-memory ImageTextDataset)."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int], transform: Transform, *,
              seed: int | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]: ...


@dataclass(frozen=True)
class Batch:
    """One worker's share of one training step."""

    step: int
    images_BCHW: torch.Tensor  # float32, normalised
    ids_BL: torch.Tensor  # int64 token ids, 0-padded
    mask_BL: torch.Tensor  # bool, True on real tokens

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.step, self.images_BCHW.to(device), self.ids_BL.to(device),
                     self.mask_BL.to(device))


def local_batch_size(batch_size: int, world: int) -> int:
    """Samples per worker per step; ValueError unless the global batch splits evenly."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} workers")
    return batch_size // world


def worker_indices(n: int, batch_size: int, *, seed: int, step: int, rank: int = 0,
                   world: int = 1) -> list[int]:
    """Worker `rank`'s contiguous slice of global step `step`'s sample indices."""
    local = local_batch_size(batch_size, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return batch_indices(n, batch_size, seed=seed, step=step)[rank * local:(rank + 1) * local]


def make_batch(index: BatchSource, indices: Sequence[int], *, step: int, seed: int,
               transform: Transform, tokenizer, context_length: int) -> Batch:
    """Read, decode, augment (seeded by step and sample) and tokenise `indices` of step `step`."""
    images_BCHW, captions, _ = index.batch(indices, transform, seed=combine_seed(seed, step))
    ids_BL, mask_BL = encode_captions(tokenizer, captions, context_length)
    return Batch(step, images_BCHW, ids_BL, mask_BL)


def train_transform(cfg) -> Transform:
    """The training augmentation of `cfg` (expertpar.config.Config)."""
    return make_transform(cfg.data.image_size, train=True, hflip=cfg.data.hflip)


def train_batches(index: BatchSource, cfg, tokenizer, *, start: int, end: int, rank: int = 0,
                  world: int = 1) -> Iterator[Batch]:
    """This worker's batches of steps [start, end), in process (cfg: expertpar.config.Config)."""
    transform = train_transform(cfg)
    n, batch_size, seed = len(index), cfg.train.batch_size, cfg.run.seed
    for step in range(start, end):
        yield make_batch(index, worker_indices(n, batch_size, seed=seed, step=step, rank=rank,
                                               world=world),
                         step=step, seed=seed, transform=transform, tokenizer=tokenizer,
                         context_length=cfg.tokenizer.context_length)


__all__ = ["Batch", "BatchSource", "local_batch_size", "make_batch", "train_batches",
           "train_transform", "worker_indices"]

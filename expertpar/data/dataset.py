"""In-memory image-text dataset for the training loop, with deterministic batching."""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from .catalog import DatasetInfo, find_dataset_info
from .errors import SampleError, SkipStats
from .formats import iter_samples
from .images import Transform, apply_transform, decode_image
from .sample import RawSample, checked_caption, label_of

logger = logging.getLogger("expertpar")

_SEED_MULT = 1_000_003
_SEED_MOD = 2**63


def combine_seed(seed: int, index: int) -> int:
    """Deterministic (hash-free) seed for item `index` of a stream seeded with `seed`."""
    return (seed * _SEED_MULT + index) % _SEED_MOD


def validate_sample(raw: RawSample) -> tuple[Image.Image, str]:
    """Decoded RGB image and stripped caption, or SampleError naming why not."""
    if raw.error is not None:
        raise SampleError(*raw.error)
    caption = checked_caption(raw.key, raw.caption, has_image=raw.image is not None)
    return decode_image(raw.image, key=raw.key), caption  # type: ignore[arg-type]


class StoredSample(NamedTuple):
    """A validated sample kept in memory: encoded image bytes, not pixels."""

    key: str
    image: bytes
    caption: str
    label: int  # -1 when unknown


def to_stored(raw: RawSample) -> StoredSample:
    """The validated, in-memory form of a sample; raises SampleError naming why not."""
    _, caption = validate_sample(raw)
    return StoredSample(raw.key, raw.image, caption, label_of(raw.key, raw.meta))  # type: ignore[arg-type]


def sample_tensor(sample: StoredSample, index: int, transform: Transform, *,
                  seed: int | None) -> torch.Tensor:
    """Decode and transform one sample; with `seed`, its augmentation depends on (seed, index)."""
    image = decode_image(sample.image, key=sample.key)
    return apply_transform(transform, image,
                           seed=None if seed is None else combine_seed(seed, int(index)))


class ImageTextDataset:
    """Validated samples of one source, held in memory as encoded bytes."""

    def __init__(self, samples: list[StoredSample], skipped: SkipStats | None = None,
                 info: DatasetInfo | None = None) -> None:
        self.samples = samples
        self.skipped = skipped if skipped is not None else SkipStats()
        self.info = info

    @classmethod
    def load(cls, source: str | Path, *, max_samples: int | None = None) -> ImageTextDataset:
        """Read and validate `source`, skipping (and counting) bad samples.

        `max_samples` caps the number of valid samples kept.
        """
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples}")
        samples: list[StoredSample] = []
        skipped = SkipStats()
        for raw in iter_samples(source):
            if max_samples is not None and len(samples) >= max_samples:
                break
            try:
                samples.append(to_stored(raw))
            except SampleError as exc:
                skipped.add(exc.reason)
                logger.warning("skipping sample %r (%s): %s", raw.key, exc.reason, exc)
        if skipped.total:
            logger.warning("%s: kept %d samples, skipped %d (%s)", source, len(samples), skipped.total,
                           ", ".join(f"{r}={n}" for r, n in sorted(skipped.counts.items())))
        return cls(samples, skipped, find_dataset_info(source))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]

    @property
    def labels(self) -> torch.Tensor:
        """int64 labels (-1 = unknown), one per sample."""
        return torch.tensor([s.label for s in self.samples], dtype=torch.int64)

    def batch(self, indices: Sequence[int], transform: Transform, *,
              seed: int | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """images_BCHW float32, captions, labels_B int64 for the given sample indices.

        With `seed`, sample i is augmented with seed `combine_seed(seed, i)`, so the
        result does not depend on batch composition or global RNG state. Pass a seed
        that changes per step/epoch if a sample should see new augmentations.
        """
        if len(indices) == 0:
            raise ValueError("batch() needs at least one index")
        images, captions, labels = [], [], []
        for index in indices:
            if not 0 <= index < len(self.samples):
                raise IndexError(f"sample index {index} out of range for a dataset of {len(self.samples)}")
            sample = self.samples[index]
            images.append(sample_tensor(sample, index, transform, seed=seed))
            captions.append(sample.caption)
            labels.append(sample.label)
        return torch.stack(images), captions, torch.tensor(labels, dtype=torch.int64)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # Every step of an epoch slices the same permutation; computing it once per epoch (not
    # per step) matters at millions of samples. Callers must not modify the tensor.
    generator = torch.Generator().manual_seed(combine_seed(seed, epoch))
    return torch.randperm(n, generator=generator)


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (n, seed, epoch)."""
    if n < 0 or epoch < 0:
        raise ValueError(f"n and epoch must be >= 0, got n={n}, epoch={epoch}")
    return _epoch_permutation(n, seed, epoch).tolist()


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (drop_last); ValueError if not even one fits."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < batch_size:
        raise ValueError(f"dataset has {n} samples, fewer than batch_size {batch_size}")
    return n // batch_size


def batch_indices(n: int, batch_size: int, *, seed: int, step: int) -> list[int]:
    """Sample indices of global training step `step` (drop_last across epochs).

    A pure function of its arguments, so a resumed run reads the same batches.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, within = divmod(step, steps_per_epoch(n, batch_size))
    order = _epoch_permutation(n, seed, epoch)  # = epoch_order(n, seed=seed, epoch=epoch)
    return order[within * batch_size:(within + 1) * batch_size].tolist()


__all__ = ["ImageTextDataset", "SkipStats", "StoredSample", "batch_indices", "checked_caption",
           "combine_seed", "epoch_order", "label_of", "sample_tensor", "steps_per_epoch",
           "validate_sample"]

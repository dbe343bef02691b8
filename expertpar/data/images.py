"""torchvision (v2) transforms with per-sample seeding; decoding is in decode.py."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from .decode import MAX_PIXELS, decode_image, to_rgb
from .errors import SampleError

Transform = Callable[[Image.Image], torch.Tensor]


def make_transform(image_size: int, *, train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                   std: Sequence[float] = (0.5, 0.5, 0.5), hflip: bool = False) -> Transform:
    """PIL RGB image -> normalised float32 tensor (3, image_size, image_size).

    Train: RandomResizedCrop(scale 0.8-1); flips are off by default because captions
    say "left of"/"right of". Eval: Resize shorter side + CenterCrop.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean/std need 3 values, got mean={tuple(mean)} std={tuple(std)}")
    if train:
        geometry: list = [v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True)]
        if hflip:
            geometry.append(v2.RandomHorizontalFlip())
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([
        v2.ToImage(),  # uint8 tensor first: resizing uint8 tensors is fast
        *geometry,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),  # plain Tensor out, not a tv_tensors.Image subclass
    ])


def apply_transform(transform: Transform, img: Image.Image, *, seed: int | None) -> torch.Tensor:
    """Run `transform`; with a seed its randomness depends only on that seed.

    The global torch RNG is forked, so neither the caller's RNG state nor other
    samples influence this sample's augmentation (and vice versa).
    """
    if seed is None:
        return transform(img)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


__all__ = ["MAX_PIXELS", "SampleError", "Transform", "apply_transform", "decode_image", "make_transform", "to_rgb"]

"""Image transforms with per-sample seeding, in plain torch; decoding is in decode.py.

The pipelines compute exactly what the torchvision v2 pipelines they replace computed
(ToImage, RandomResizedCrop / Resize + CenterCrop, RandomHorizontalFlip, ToDtype, Normalize),
bit for bit and with the same torch RNG draws, so a seed gives the same crop as before. They
avoid torchvision because importing it (models, ops -> torch._dynamo, sympy) costs seconds of
CPU in every Ray process that unpickles our data code.
"""
from __future__ import annotations

import math
import platform
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decode import MAX_PIXELS, decode_image, to_rgb
from .errors import SampleError

Transform = Callable[[Image.Image], torch.Tensor]

# RandomResizedCrop's area and aspect-ratio ranges.
_SCALE = (0.8, 1.0)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _to_chw_uint8(img: Image.Image) -> torch.Tensor:
    # A CHW view of an HWC copy, channels-last rather than contiguous: the resize below is
    # handed (and returns) the same memory layout the torchvision pipeline had.
    arr = np.array(img, copy=True)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected an 8-bit image, got mode {img.mode!r}")
    hwc = torch.from_numpy(arr).view(img.height, img.width, len(img.getbands()))
    return hwc.permute(2, 0, 1)


def _uint8_bilinear_is_native() -> bool:
    # torch resizes uint8 directly only where it has a fast kernel (AVX2/AVX512, ARM);
    # elsewhere it goes through float32 and rounds back. Both give slightly different
    # pixels, so follow the same rule as the pipeline this replaced.
    if torch.compiler.is_compiling():
        return True
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            or platform.machine() in ("aarch64", "arm64"))


def _resize(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 CHW tensor; returns it as is when the size matches."""
    channels, old_h, old_w = chw.shape
    if (old_h, old_w) == (height, width):
        return chw
    x = chw.reshape(1, channels, old_h, old_w)
    numel = x.numel()
    if x.is_contiguous(memory_format=torch.channels_last) and x.stride(0) != numel:
        # interpolate gives a contiguous output when a 1xCxHxW channels-last input has an
        # ambiguous batch stride; a batch stride of numel keeps the output channels-last,
        # the layout (and uint8 code path) of the pipeline this replaced.
        x = x.as_strided(x.shape, (numel, *x.stride()[1:]))
    native = _uint8_bilinear_is_native()
    if not native:
        x = x.to(torch.float32)
    x = F.interpolate(x, size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    if not native:
        x = x.round_().to(torch.uint8)
    return x.reshape(channels, height, width)


def _random_crop_box(height: int, width: int, log_ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w): a random area and aspect ratio, up to 10 tries, else a central crop.

    Every draw goes through the global torch RNG in the order and dtype torchvision's
    RandomResizedCrop used, so a seed picks the same box as before.
    """
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*_SCALE).item()
        aspect = torch.exp(torch.empty(1).uniform_(*log_ratio)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    # No try fitted (an extreme aspect ratio): clamp the image's ratio into range, centred.
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        w, h = int(round(height * _RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize_shorter_side(chw: torch.Tensor, size: int) -> torch.Tensor:
    h, w = chw.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)  # truncated, in this order, as torchvision did
    new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    return _resize(chw, new_h, new_w)


def _center_crop(chw: torch.Tensor, size: int) -> torch.Tensor:
    # The shorter side was just resized to `size`, so the image is never smaller than
    # the crop. round() (half to even), not //, places odd margins as torchvision did.
    h, w = chw.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return chw[..., top:top + size, left:left + size]


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
    if not all(std):
        raise ValueError(f"std must be non-zero, got std={tuple(std)}")
    return _Pipeline(image_size, train, hflip, mean, std)


class _Pipeline:
    """The transform make_transform returns: a plain class, so pickle (Ray) ships it by reference."""

    def __init__(self, image_size: int, train: bool, hflip: bool, mean: Sequence[float],
                 std: Sequence[float]):
        self.image_size, self.train, self.hflip = image_size, train, hflip
        self.mean_C11 = torch.as_tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std_C11 = torch.as_tensor(list(std), dtype=torch.float32).view(3, 1, 1)
        # The ratio bounds are drawn between as float32 logs, as torchvision stored them.
        self.log_ratio = tuple(torch.log(torch.tensor(_RATIO)).tolist())

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = _to_chw_uint8(img)  # uint8 first: resizing uint8 tensors is fast
        if self.train:
            top, left, h, w = _random_crop_box(x.shape[-2], x.shape[-1], self.log_ratio)
            x = _resize(x[..., top:top + h, left:left + w], self.image_size, self.image_size)
            if self.hflip and torch.rand(1) < 0.5:  # no draw at all when flips are off
                x = x.flip(-1)
        else:
            x = _center_crop(_resize_shorter_side(x, self.image_size), self.image_size)
        # Multiply by the float32 reciprocal of 255 (not divide) and normalise with sub then
        # div: each rounds differently, and these are the operations the old pipeline ran.
        return x.to(torch.float32).mul_(1.0 / 255).sub(self.mean_C11).div_(self.std_C11)

    def __repr__(self) -> str:
        kind = f"train, hflip={self.hflip}" if self.train else "eval"
        return f"{type(self).__name__}({self.image_size}, {kind})"


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

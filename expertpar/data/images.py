"""Image decoding to RGB and torchvision (v2) transforms with per-sample seeding."""
from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .errors import SampleError

# Our own pixel cap, below Pillow's default MAX_IMAGE_PIXELS (~89M), so a bomb is
# rejected here with a clear error instead of Pillow first emitting a warning.
MAX_PIXELS = 50_000_000

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}

Transform = Callable[[Image.Image], torch.Tensor]


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    # Pillow's own I/F -> L conversion clips at 255 instead of rescaling, which turns
    # 16-bit images white; rescale explicitly.
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
    elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        arr = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(img: Image.Image) -> Image.Image:
    # Transparent pixels often carry arbitrary (black) colour; compositing over white
    # matches how a viewer would show e.g. a logo PNG.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _INT_MODES or mode == "F":
        return _to_8bit_gray(img).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def decode_image(data: bytes, *, key: str = "?", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode and fully load image bytes as RGB; SampleError('corrupt_image') on failure."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise SampleError("corrupt_image", f"sample {key!r}: image is {width}x{height} pixels, "
                                  f"over the {max_pixels} pixel limit (possible decompression bomb)")
            img.load()  # decode now so truncated data fails here, not inside a transform
            return to_rgb(img)
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleError("corrupt_image", f"sample {key!r}: decompression bomb rejected: {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        # Pillow's format plugins raise many unrelated types on malformed input
        # (OSError, SyntaxError, struct.error, IndexError, ...); any of them means
        # this one sample is unusable, which must not end a training run.
        raise SampleError("corrupt_image", f"sample {key!r}: cannot decode image: "
                          f"{type(exc).__name__}: {exc}") from exc


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

"""Image decoding to 8-bit RGB with Pillow, refusing what cannot be decoded.

Kept apart from the transforms (images.py) so that indexing a shard — which decodes every image
once to refuse bad samples — needs Pillow and numpy only, not torch: a Ray task that scans
shards starts in a fraction of the time.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import SampleError

# Our own pixel cap, below Pillow's default MAX_IMAGE_PIXELS (~89M), so a bomb is
# rejected here with a clear error instead of Pillow first emitting a warning.
MAX_PIXELS = 50_000_000

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}

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

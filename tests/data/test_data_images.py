"""Tests for image decoding to RGB and the transforms, checked bit for bit against torchvision v2."""
from __future__ import annotations

import io
import os
import platform
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from expertpar.data.images import SampleError, apply_transform, decode_image, make_transform


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgb_image(size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def test_grayscale_becomes_rgb() -> None:
    img = decode_image(_encode(Image.new("L", (8, 8), 100)))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (100, 100, 100)


def test_16bit_is_rescaled_not_clipped() -> None:
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 257 * 10
    src = Image.fromarray(arr)
    assert src.mode.startswith("I;16")
    img = decode_image(_encode(src))
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((0, 0)) == (10, 10, 10)


def test_float_image_in_unit_range() -> None:
    img = decode_image(_encode(Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32), mode="F"), "TIFF"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (128, 128, 128)


def test_palette_with_transparency_composites_on_white() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 1), 1)
    img = decode_image(_encode(pal, transparency=0))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white
    assert img.getpixel((1, 1)) == (200, 10, 10)


def test_rgba_composites_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    img = decode_image(_encode(rgba))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = img.getpixel((1, 0))
    assert 120 <= r <= 135 and b == 255  # half-transparent blue over white


def test_la_and_cmyk_jpeg_become_rgb() -> None:
    assert decode_image(_encode(Image.new("LA", (3, 3), (50, 255)))).getpixel((0, 0)) == (50, 50, 50)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data)
    assert img.mode == "RGB"
    r, g, b = img.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_ycbcr_and_webp_become_rgb() -> None:
    assert decode_image(_encode(_rgb_image(), "WEBP")).mode == "RGB"
    assert decode_image(_encode(_rgb_image().convert("YCbCr"), "JPEG")).mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_corrupt_bytes_raise_sample_error(data: bytes | None) -> None:
    if data is None:
        data = _encode(_rgb_image((64, 64)))[:200]  # truncated PNG: header parses, pixels do not
    with pytest.raises(SampleError, match="key-42") as info:
        decode_image(data, key="key-42")
    assert info.value.reason == "corrupt_image"
    assert isinstance(info.value, ValueError)


def test_pixel_limit_guards_bombs() -> None:
    with pytest.raises(SampleError, match="decompression bomb") as info:
        decode_image(_encode(_rgb_image((40, 30))), key="big", max_pixels=1000)
    assert info.value.reason == "corrupt_image"


def _png_claiming(width: int, height: int) -> bytes:
    # A 1x1 PNG whose header (IHDR, with a valid CRC) says width x height: a bomb's header
    # in a few dozen bytes.
    data = bytearray(_encode(_rgb_image((1, 1))))
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# 8,000^2 is over our 50 M pixel cap only; 100,000^2 is over Pillow's own bomb limit as well.
@pytest.mark.parametrize("side", [8_000, 100_000])
def test_a_header_claiming_a_bomb_size_is_refused_from_the_header(side: int) -> None:
    # Decoding the pixels would fail as "cannot decode" (there is one pixel of data), so the
    # bomb message shows the header alone refused it.
    with pytest.raises(SampleError, match="decompression bomb") as info:
        decode_image(_png_claiming(side, side), key="bomb")
    assert info.value.reason == "corrupt_image" and "'bomb'" in str(info.value)


@pytest.mark.parametrize("train", [True, False])
def test_transform_shape_and_dtype(train: bool) -> None:
    transform = make_transform(24, train=train)
    out = transform(_rgb_image((40, 30)))
    assert type(out) is torch.Tensor
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert -1.0 <= out.min() and out.max() <= 1.0  # default mean/std 0.5 maps [0,1] to [-1,1]


def test_eval_transform_is_deterministic() -> None:
    transform = make_transform(16, train=False)
    img = _rgb_image()
    assert torch.equal(transform(img), transform(img))


def test_seeded_train_transform_is_reproducible_and_isolated() -> None:
    transform = make_transform(16, train=True, hflip=True)
    img = _rgb_image((64, 48))
    torch.manual_seed(123)
    a = apply_transform(transform, img, seed=7)
    after_a = torch.rand(1)
    torch.manual_seed(999)  # different global state must not matter
    torch.rand(5)
    b = apply_transform(transform, img, seed=7)
    assert torch.equal(a, b)
    torch.manual_seed(123)
    apply_transform(transform, img, seed=8)
    assert torch.equal(torch.rand(1), after_a)  # the caller's RNG stream is untouched
    outs = {apply_transform(transform, img, seed=s).sum().item() for s in range(6)}
    assert len(outs) > 1  # different seeds give different crops


def _torchvision_pipeline(image_size: int, *, train: bool, mean, std, hflip: bool):
    # The v2 pipeline make_transform built before it dropped torchvision: the reference.
    from torchvision.transforms import v2

    if train:
        geometry: list = [v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True)]
        if hflip:
            geometry.append(v2.RandomHorizontalFlip())
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=list(mean), std=list(std)), v2.ToPureTensor()])


# (width, height): tiny, 1 x N both ways, square, equal to / smaller / larger than the
# targets, non-square both ways, and aspect ratios so extreme that all 10 crop tries
# miss and RandomResizedCrop falls back to a central crop (e.g. 3 x 90).
_SIZES = [(1, 1), (1, 9), (9, 1), (1, 40), (40, 1), (2, 3), (3, 90), (90, 3), (8, 8), (24, 24),
          (33, 33), (24, 40), (40, 24), (33, 17), (17, 33), (31, 32), (64, 48), (48, 64),
          (97, 61), (61, 97), (120, 120)]
_TARGETS = [1, 8, 24, 33]
_MODES = [(True, False), (True, True), (False, False)]  # (train, hflip)


def _compare_with_torchvision(seeds: range) -> int:
    rng = np.random.default_rng(5)
    stats = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    compared = 0
    for width, height in _SIZES:
        img = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")
        for size in _TARGETS:
            for train, hflip in _MODES:
                kw = dict(train=train, hflip=hflip, **(stats if size % 2 else {}))
                ours = make_transform(size, **kw)
                ref = _torchvision_pipeline(size, mean=kw.get("mean", (0.5,) * 3),
                                            std=kw.get("std", (0.5,) * 3), train=train, hflip=hflip)
                for seed in seeds if train else seeds[:1]:
                    # Seeded as apply_transform seeds; then the same number of draws from the
                    # same stream: what the next sample draws is the same too.
                    case = (width, height, size, train, hflip, seed)
                    torch.manual_seed(seed)
                    a, after_ours = ours(img), torch.rand(3)
                    torch.manual_seed(seed)
                    b, after_ref = ref(img), torch.rand(3)
                    assert type(a) is torch.Tensor and torch.equal(a, b), case
                    assert a.stride() == b.stride() and torch.equal(after_ours, after_ref), case
                    compared += 1
    return compared


def test_transforms_match_torchvision_bit_for_bit() -> None:
    assert _compare_with_torchvision(range(4)) > 700


def test_transforms_match_torchvision_without_a_native_uint8_resize(monkeypatch) -> None:
    # On CPUs without AVX2 (and not ARM) both sides resize in float32 and round back to uint8.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert _compare_with_torchvision(range(1)) > 200


def test_extreme_aspect_ratio_falls_back_to_the_central_crop() -> None:
    # 3 x 90: no try fits, so every seed gives the same centred crop.
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(90, 3, 3), dtype=np.uint8))
    transform = make_transform(8, train=True)
    first = apply_transform(transform, img, seed=0)
    assert all(torch.equal(first, apply_transform(transform, img, seed=s)) for s in range(1, 5))


def test_zero_std_is_refused() -> None:
    with pytest.raises(ValueError, match="non-zero"):
        make_transform(8, train=False, std=(0.5, 0.0, 0.5))


def test_transforms_do_not_import_torchvision() -> None:
    # Every Ray process that unpickles the data or model code would pay its seconds of import.
    code = ("import sys, expertpar.data.images, expertpar.model.stems; "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'")
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [repo] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]

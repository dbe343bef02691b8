"""Compositional synthetic shapes: coloured objects in spatial relations, with captions.

Small enough to train on in seconds, yet captions carry structure (colour, shape,
size, relation) that a bag-of-pixels model cannot fake.
"""
from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .catalog import DatasetInfo, write_dataset_info
from .sample import RawSample
from .webdataset import write_webdataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.35, "large": 0.5}  # object extent as a fraction of the image side
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
CLASSES: list[str] = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
TEMPLATES: tuple[str, ...] = ("a {}", "a small {}", "a large {}")
BACKGROUND = (48, 48, 48)
NOISE = 10  # max absolute per-channel pixel noise
SUPERSAMPLE = 4  # draw large, then downsample, for anti-aliased edges


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        s = half * 0.85  # a bit smaller so its area is close to the circle's
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half * 0.85), (cx + half, cy + half * 0.85)], fill=fill)
    elif shape == "cross":
        t = half * 0.3
        draw.rectangle((cx - half, cy - t, cx + half, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - half, cx + t, cy + half), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _place(rng: random.Random, half: float, size: int, centre: float | None, jitter: float) -> float:
    # A coordinate keeping the object inside the image; near `centre` when given.
    lo, hi = half + 0.5, size - half - 0.5
    value = rng.uniform(lo, hi) if centre is None else centre + rng.uniform(-jitter, jitter)
    return min(max(value, lo), hi)


def make_sample(rng: random.Random, *, image_size: int = 32) -> tuple[Image.Image, str, int]:
    """One (RGB image, caption, label) drawn only from `rng`; label indexes CLASSES.

    The main object (the label) is named first; with probability 0.5 a second object
    of another colour/shape follows, and the relation says where the main object is.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 to draw shapes, got {image_size}")
    s = image_size
    label = rng.randrange(len(CLASSES))
    size_name = rng.choice(list(SIZES))
    objects = [(CLASSES[label], size_name)]
    caption = f"a {size_name} {CLASSES[label]}"
    relation = None
    if rng.random() < 0.5:
        other = rng.choice([c for c in range(len(CLASSES)) if c != label])
        other_size = rng.choice(list(SIZES))
        relation = rng.choice(RELATIONS)
        objects.append((CLASSES[other], other_size))
        caption += f" {relation} a {other_size} {CLASSES[other]}"

    big = s * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, (name, size) in enumerate(objects):
        color, shape = name.split(" ")
        half = SIZES[size] * s / 2
        if relation is None:
            cx, cy = _place(rng, half, s, None, 0), _place(rng, half, s, None, 0)
        else:
            # The main object takes the first slot (top/left) when it is above/left of the other.
            main_first = relation in ("above", "left of")
            slot = 0.25 * s if (index == 0) == main_first else 0.75 * s
            along = _place(rng, half, s, slot, 0.04 * s)
            across = _place(rng, half, s, 0.5 * s, 0.15 * s)
            cx, cy = (across, along) if relation in ("above", "below") else (along, across)
        _draw_shape(draw, shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, half * SUPERSAMPLE, COLORS[color])
    image = canvas.resize((s, s), Image.Resampling.BOX)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.int16) + noise_rng.integers(-NOISE, NOISE + 1, size=(s, s, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"), caption, label


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def iter_synthetic(n: int, *, seed: int | str, split: str, image_size: int = 32) -> Iterator[RawSample]:
    """`n` synthetic RawSamples (PNG) of one split; the stream depends on (seed, split)."""
    # String seeding hashes with SHA-512, so the stream is stable across processes
    # and distinct per split.
    rng = random.Random(f"synthetic-shapes/{split}/{seed}")
    for i in range(n):
        image, caption, label = make_sample(rng, image_size=image_size)
        yield RawSample(key=f"{split}-{i:08d}", image=_png(image), image_ext="png", caption=caption,
                        meta={"label": label, "class_name": CLASSES[label]})


def write_synthetic(out_dir: str | Path, *, n_train: int, n_test: int, seed: int = 0,
                    image_size: int = 32, shard_size: int = 1000) -> Path:
    """Write `train/` and `test/` shards plus dataset.json under `out_dir`; returns out_dir."""
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    out_dir = Path(out_dir)
    for split, n in (("train", n_train), ("test", n_test)):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        write_webdataset(iter_synthetic(n, seed=seed, split=split, image_size=image_size),
                         out_dir / split, shard_size=shard_size, prefix="shard")
    info = DatasetInfo(name="synthetic-shapes", classes=tuple(CLASSES), templates=TEMPLATES,
                       splits={"train": "train", "test": "test"})
    write_dataset_info(info, out_dir)
    return out_dir


__all__ = ["CLASSES", "COLORS", "RELATIONS", "SHAPES", "SIZES", "TEMPLATES",
           "iter_synthetic", "make_sample", "write_synthetic"]

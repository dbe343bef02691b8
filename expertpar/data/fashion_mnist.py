"""Convert Fashion-MNIST IDX files (Debian `dataset-fashion-mnist`) to WebDataset shards."""
from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .catalog import DatasetInfo, write_dataset_info
from .sample import RawSample
from .webdataset import write_webdataset

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TEMPLATES: tuple[str, ...] = ("a photo of a {}", "a {}", "a picture of a {}")
# split name -> IDX file stem (images, labels), as published upstream.
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":  # not gzip, whatever the name says
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt gzip data: {exc}") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into an array of its declared dtype/shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: bad IDX magic {data[:4].hex() or '(empty)'}; expected 0000<type><ndim>")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unsupported IDX type code 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = len(data) - header
    if body != expected:
        what = "truncated" if body < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX data {what}: {body} bytes for shape {dims}, expected {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(f"Fashion-MNIST file not found: {source / (stem + '.gz')} (or {stem} "
                            f"without .gz); install it with `apt-get install dataset-fashion-mnist` "
                            f"or pass source=<dir with the IDX files>")


def load_split(source: str | Path, split: str, *, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of one split, first `limit` only if given."""
    source = Path(source)
    image_stem, label_stem = SPLIT_FILES[split]
    image_path, label_path = _find(source, image_stem), _find(source, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{label_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{label_path}: labels must be in 0..{len(CLASSES) - 1}, "
                         f"found {labels.min()}..{labels.max()}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def caption_for(split: str, index: int, label: int) -> str:
    """Caption of sample `index`: its class (lowercase) in a template fixed by (split, index)."""
    # crc32 rather than hash(): stable across processes, and not periodic in index.
    template = TEMPLATES[zlib.crc32(f"{split}/{index}".encode()) % len(TEMPLATES)]
    return template.format(CLASSES[label].lower())


def _iter_split(images: np.ndarray, labels: np.ndarray, split: str) -> Iterator[RawSample]:
    for index, (pixels, label) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        label = int(label)
        yield RawSample(key=f"{split}-{index:06d}", image=buf.getvalue(), image_ext="png",
                        caption=caption_for(split, index, label),
                        meta={"label": label, "class_name": CLASSES[label]})


def convert_fashion_mnist(out_dir: str | Path, *, source: str | Path = DEFAULT_SOURCE,
                          limit: int | None = None, shard_size: int = 5000) -> Path:
    """Write `out_dir/{train,test}/shard-*.tar` and dataset.json; returns out_dir."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out_dir = Path(out_dir)
    # Read (and validate) both splits before writing anything.
    splits = {split: load_split(source, split, limit=limit) for split in SPLIT_FILES}
    for split, (images, labels) in splits.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        write_webdataset(_iter_split(images, labels, split), out_dir / split, shard_size=shard_size, prefix="shard")
    info = DatasetInfo(name="fashion-mnist", classes=CLASSES, templates=TEMPLATES,
                       splits={split: split for split in SPLIT_FILES})
    write_dataset_info(info, out_dir)
    return out_dir


__all__ = ["CLASSES", "DEFAULT_SOURCE", "TEMPLATES", "caption_for", "convert_fashion_mnist", "load_split", "read_idx"]

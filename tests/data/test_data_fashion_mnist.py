"""Tests for the Fashion-MNIST IDX reader and WebDataset converter."""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from expertpar.data.catalog import read_dataset_info
from expertpar.data.dataset import ImageTextDataset
from expertpar.data.fashion_mnist import CLASSES, DEFAULT_SOURCE, convert_fashion_mnist, read_idx
from expertpar.data.formats import iter_samples


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool) -> None:
    data = _idx_bytes(arr)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)


def _fake_source(root: Path, n_train: int = 12, n_test: int = 5) -> tuple[Path, dict]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, stem, n, gz in (("train", "train", n_train, True), ("test", "t10k", n_test, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 7 + 3) % 10
        _write_idx(root / f"{stem}-images-idx3-ubyte", images, gz=gz)  # train gzipped, test raw
        _write_idx(root / f"{stem}-labels-idx1-ubyte", labels, gz=gz)
        arrays[split] = (images, labels)
    return root, arrays


def test_read_idx(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte", arr, gz=False)
    _write_idx(tmp_path / "b-idx3-ubyte", arr, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), arr)
    assert np.array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), arr)


def test_read_idx_bad_magic_and_truncation(tmp_path: Path) -> None:
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad-magic.*magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((4, 2, 2), np.uint8))[:-3])
    with pytest.raises(ValueError, match="short.*truncated"):
        read_idx(short)


def test_convert_small_fake_dataset(tmp_path: Path) -> None:
    source, arrays = _fake_source(tmp_path / "src")
    out = convert_fashion_mnist(tmp_path / "out", source=source, shard_size=5)
    info = read_dataset_info(out)
    assert info.name == "fashion-mnist" and info.classes == CLASSES and set(info.splits) == {"train", "test"}
    for split, n in (("train", 12), ("test", 5)):
        samples = list(iter_samples(out / split))
        images, labels = arrays[split]
        assert len(samples) == n
        assert [s.meta["label"] for s in samples] == labels.tolist()
        for sample, pixels, label in zip(samples, images, labels):
            assert sample.caption.endswith(CLASSES[label].lower())
            assert sample.meta["class_name"] == CLASSES[label]
            decoded = Image.open(io.BytesIO(sample.image))
            assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), pixels)
    assert len({s.caption.split(" a")[0] for s in iter_samples(out / "train")}) > 1  # templates vary
    ds = ImageTextDataset.load(out / "test")
    assert len(ds) == 5 and ds.labels.tolist() == arrays["test"][1].tolist() and ds.info == info


def test_convert_limit_and_errors(tmp_path: Path) -> None:
    source, _ = _fake_source(tmp_path / "src")
    out = convert_fashion_mnist(tmp_path / "out", source=source, limit=3)
    assert len(list(iter_samples(out / "train"))) == 3 and len(list(iter_samples(out / "test"))) == 3
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        convert_fashion_mnist(tmp_path / "x", source=tmp_path / "empty")
    (source / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="5 images.*4 labels"):
        convert_fashion_mnist(tmp_path / "y", source=source)


@pytest.mark.skipif(not (Path(DEFAULT_SOURCE) / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST not installed in {DEFAULT_SOURCE} (apt-get install dataset-fashion-mnist)")
def test_convert_real_debian_files(tmp_path: Path) -> None:
    out = convert_fashion_mnist(tmp_path / "fm", limit=50)
    for split in ("train", "test"):
        ds = ImageTextDataset.load(out / split)
        assert len(ds) == 50 and ds.skipped.total == 0
        assert ds.labels.min() >= 0 and ds.labels.max() <= 9
        assert all(CLASSES[label].lower() in caption for caption, label in zip(ds.captions, ds.labels.tolist()))

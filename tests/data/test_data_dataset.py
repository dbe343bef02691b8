"""Tests for ImageTextDataset (validation, skipping, batching) and step-indexed batch order."""
from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from shard_helpers import add_member, png

from expertpar.data.dataset import (
    ImageTextDataset,
    SkipStats,
    batch_indices,
    epoch_order,
    validate_sample,
)
from expertpar.data.errors import SampleError
from expertpar.data.formats import RawSample, write_webdataset
from expertpar.data.images import make_transform
from expertpar.data.synthetic import write_synthetic


@pytest.fixture()
def messy_shard(tmp_path: Path) -> Path:
    shard = tmp_path / "messy" / "shard-00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i in range(4):  # good samples
            add_member(tar, f"good{i}.png", png((60 * i, 0, 0)))
            add_member(tar, f"good{i}.json", json.dumps({"caption": f"red number {i}", "label": i}).encode())
        add_member(tar, "corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg")
        add_member(tar, "corrupt.txt", b"a caption")
        add_member(tar, "empty.png", png((1, 2, 3)))
        add_member(tar, "empty.txt", b"   \n")
        add_member(tar, "nocap.png", png((1, 2, 3)))
        add_member(tar, "nocap.json", json.dumps({"label": 3}).encode())
        add_member(tar, "good9.png", png((0, 0, 200)))
        add_member(tar, "good9.txt", b"a blue square without label")
    return shard


def test_load_skips_and_counts_bad_samples(messy_shard: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        ds = ImageTextDataset.load(messy_shard.parent)
    assert len(ds) == 5 and [s.key for s in ds.samples] == ["good0", "good1", "good2", "good3", "good9"]
    assert ds.skipped.total == 3
    assert ds.skipped.counts == {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1}
    metrics = ds.skipped.as_metrics()
    assert metrics["data/skipped/corrupt_image"] == 1 and metrics["data/skipped/missing_image"] == 0
    assert metrics["data/skipped/total"] == 3
    assert ds.labels.tolist() == [0, 1, 2, 3, -1] and ds.captions[4] == "a blue square without label"
    assert ds.info is None
    messages = caplog.text
    assert "'corrupt'" in messages and "corrupt_image" in messages and "'nocap'" in messages


def test_load_max_samples(messy_shard: Path) -> None:
    assert len(ImageTextDataset.load(messy_shard, max_samples=2)) == 2


def test_validate_sample_reasons() -> None:
    good = png((10, 20, 30))
    cases = {
        "missing_image": RawSample("k", None, None, "cap"),
        "missing_caption": RawSample("k", good, "png", None),
        "empty_caption": RawSample("k", good, "png", " \t"),
        "corrupt_image": RawSample("k", b"junk", "png", "cap"),
    }
    for reason, raw in cases.items():
        with pytest.raises(SampleError) as info:
            validate_sample(raw)
        assert info.value.reason == reason
    image, caption = validate_sample(RawSample("k", good, "png", "  cap "))
    assert image.mode == "RGB" and caption == "cap"


def test_skip_stats() -> None:
    stats = SkipStats()
    stats.add("corrupt_image")
    stats.add("corrupt_image")
    assert stats.total == 2 and stats.as_metrics("p/") ["p/corrupt_image"] == 2


def test_batch_shapes_and_seeded_augmentation(tmp_path: Path) -> None:
    out = write_synthetic(tmp_path / "syn", n_train=12, n_test=2, seed=0)
    ds = ImageTextDataset.load(out / "train")
    assert ds.info is not None and ds.info.name == "synthetic-shapes"
    train_tf = make_transform(24, train=True)
    images, captions, labels = ds.batch([3, 1, 4], train_tf, seed=11)
    assert images.shape == (3, 3, 24, 24) and images.dtype == torch.float32
    assert captions == [ds.captions[i] for i in (3, 1, 4)] and labels.tolist() == ds.labels[[3, 1, 4]].tolist()
    # A sample's augmentation depends on (seed, index) only, not on its batch-mates.
    again, _, _ = ds.batch([4, 0], train_tf, seed=11)
    assert torch.equal(images[2], again[0])
    other, _, _ = ds.batch([4], train_tf, seed=12)
    assert not torch.equal(other[0], again[0])
    with pytest.raises(IndexError, match="99"):
        ds.batch([99], train_tf)


def test_epoch_order_is_a_deterministic_permutation() -> None:
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50)) and a == epoch_order(50, seed=1, epoch=0)
    assert a != epoch_order(50, seed=1, epoch=1) and a != epoch_order(50, seed=2, epoch=0)


def test_batch_indices_resume_and_epoch_coverage() -> None:
    n, bs = 23, 5  # 4 steps per epoch, 3 samples dropped each epoch
    sequence = [batch_indices(n, bs, seed=7, step=s) for s in range(12)]
    assert all(len(b) == bs for b in sequence)
    # Resume: computing step k from scratch equals step k of the uninterrupted run.
    for k in (0, 3, 4, 9, 11):
        assert batch_indices(n, bs, seed=7, step=k) == sequence[k]
    for epoch in range(3):
        seen = [i for b in sequence[epoch * 4:(epoch + 1) * 4] for i in b]
        assert len(seen) == len(set(seen)) == 20  # each sample at most once per epoch
        assert set(seen) <= set(range(n))
    assert sequence[:4] != sequence[4:8]  # a new shuffle each epoch
    assert batch_indices(n, bs, seed=8, step=0) != sequence[0]


def test_batch_indices_errors() -> None:
    with pytest.raises(ValueError, match="3 samples.*batch_size 4"):
        batch_indices(3, 4, seed=0, step=0)
    with pytest.raises(ValueError, match="step"):
        batch_indices(10, 2, seed=0, step=-1)


def test_manifest_source_with_missing_image(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png((9, 9, 9)))
    (tmp_path / "list.csv").write_text("filepath,caption,label\na.png,a grey square,4\ngone.png,lost,1\n")
    ds = ImageTextDataset.load(tmp_path / "list.csv")
    assert len(ds) == 1 and ds.labels.tolist() == [4] and ds.skipped.counts == {"missing_image": 1}


def test_written_shards_load(tmp_path: Path) -> None:
    samples = [RawSample(f"k{i}", png((i, i, i)), "png", f"grey {i}", {"label": i}) for i in range(3)]
    write_webdataset(samples, tmp_path)
    ds = ImageTextDataset.load(tmp_path)
    assert ds.captions == ["grey 0", "grey 1", "grey 2"] and ds.skipped.total == 0

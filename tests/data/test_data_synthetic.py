"""Tests for the synthetic shapes data set and dataset.json."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from expertpar.data.catalog import DatasetInfo, find_dataset_info, read_dataset_info, write_dataset_info
from expertpar.data.formats import iter_samples
from expertpar.data.synthetic import CLASSES, COLORS, SHAPES, make_sample, write_synthetic


def test_classes() -> None:
    assert len(CLASSES) == 16 and len(set(CLASSES)) == 16
    assert len(set(COLORS.values())) == 4 and len(SHAPES) == 4


def test_caption_names_label_first_and_image_format() -> None:
    rng = random.Random(1)
    seen_relation = seen_single = False
    for _ in range(60):
        image, caption, label = make_sample(rng, image_size=32)
        assert image.mode == "RGB" and image.size == (32, 32)
        words = caption.split(" ")
        assert words[0] == "a" and words[1] in ("small", "large")
        assert " ".join(words[2:4]) == CLASSES[label]
        if len(words) > 4:
            seen_relation = True
            assert caption.split(" a ")[1].split(" ")[-1] in SHAPES  # "... <relation> a <size> <colour> <shape>"
            assert " ".join(words[-2:]) != CLASSES[label]  # the second object is another class
        else:
            seen_single = True
    assert seen_relation and seen_single


def test_make_sample_is_deterministic() -> None:
    a = make_sample(random.Random(5), image_size=48)
    b = make_sample(random.Random(5), image_size=48)
    assert a[1:] == b[1:] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    c = make_sample(random.Random(6), image_size=48)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_relation_is_geometrically_true() -> None:
    # Find a two-object sample and check the main colour's centroid is on the named side.
    rng = random.Random(3)
    checked = 0
    while checked < 10:
        image, caption, _ = make_sample(rng, image_size=64)
        words = caption.split(" ")
        if len(words) == 4 or words[2] == words[-2]:
            continue  # single object, or both objects share a colour
        relation = " ".join(words[4:-4])
        pixels = np.asarray(image).astype(int)

        def centroid(colour: str) -> np.ndarray:
            near = np.abs(pixels - np.array(COLORS[colour])).sum(axis=2) < 60
            ys, xs = np.nonzero(near)
            return np.array([xs.mean(), ys.mean()])

        (mx, my), (ox, oy) = centroid(words[2]), centroid(words[-2])
        assert {"above": my < oy, "below": my > oy, "left of": mx < ox, "right of": mx > ox}[relation], caption
        checked += 1


def test_write_synthetic(tmp_path: Path) -> None:
    out = write_synthetic(tmp_path / "syn", n_train=25, n_test=7, seed=3, shard_size=10)
    info = read_dataset_info(out)
    assert info.name == "synthetic-shapes" and info.classes == tuple(CLASSES)
    assert info.templates == ("a {}", "a small {}", "a large {}") and info.splits == {"train": "train", "test": "test"}
    assert len(list((out / "train").glob("shard-*.tar"))) == 3
    train, test = list(iter_samples(out / "train")), list(iter_samples(out / "test"))
    assert (len(train), len(test)) == (25, 7)
    for sample in train + test:
        assert sample.image_ext == "png" and sample.image[:4] == b"\x89PNG"
        assert CLASSES[sample.meta["label"]] in sample.caption
    digests = lambda samples: {hashlib.sha256(s.image).hexdigest() for s in samples}  # noqa: E731
    assert not digests(train) & digests(test)
    again = write_synthetic(tmp_path / "again", n_train=25, n_test=7, seed=3, shard_size=10)
    assert (again / "train" / "shard-00000.tar").read_bytes() == (out / "train" / "shard-00000.tar").read_bytes()


def test_dataset_info_round_trip_and_lookup(tmp_path: Path) -> None:
    info = DatasetInfo(name="x", classes=("a", "b"), templates=("a {}",), splits={"train": "tr"})
    write_dataset_info(info, tmp_path)
    assert read_dataset_info(tmp_path / "dataset.json") == info
    (tmp_path / "tr" / "deep").mkdir(parents=True)
    assert find_dataset_info(tmp_path / "tr") == info
    assert find_dataset_info(str(tmp_path / "tr" / "shard-*.tar")) == info
    assert find_dataset_info(tmp_path / "tr" / "deep") == info  # two levels up
    other = tmp_path / "iso" / "a" / "b" / "c"  # dataset.json is 4 levels up: out of reach
    other.mkdir(parents=True)
    assert find_dataset_info(other) is None


def test_dataset_info_errors_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"name": "x", "classes": "not-a-list", "templates": ["a {}"]}))
    with pytest.raises(ValueError, match=r"dataset\.json.*'classes'"):
        read_dataset_info(path)
    path.write_text(json.dumps({"name": "x", "classes": ["a"], "templates": ["no slot"]}))
    with pytest.raises(ValueError, match=r"dataset\.json.*'templates'"):
        read_dataset_info(tmp_path)

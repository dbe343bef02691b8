"""The sample index against the sequential readers: contents, skips, caching, fallbacks, batches."""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_helpers import (CountingMap, png, write_manifest_dir, write_messy_shard,
                           write_repeated_keys_shard)

from expertpar.data.dataset import ImageTextDataset
from expertpar.data.formats import RawSample, iter_samples, write_webdataset
from expertpar.data.images import make_transform
from expertpar.data.index import INDEX_DIR, SampleIndex
from expertpar.data.scan import RECORD_DTYPE, scan_file
from expertpar.data.synthetic import write_synthetic


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test says where a fallback cache may go; none inherits one from the environment.
    monkeypatch.delenv("EXPERTPAR_CACHE_DIR", raising=False)




def _valid(source) -> list[RawSample]:
    # What ImageTextDataset.load keeps, straight from the sequential reader.
    return [s for s in iter_samples(source)
            if s.image is not None and s.caption and s.caption.strip() and _decodes(s)]


def _decodes(raw: RawSample) -> bool:
    from expertpar.data.dataset import validate_sample
    from expertpar.data.errors import SampleError
    try:
        validate_sample(raw)
    except SampleError:
        return False
    return True


def _assert_same_samples(index: SampleIndex, expected: list[RawSample]) -> None:
    assert len(index) == len(expected)
    assert list(index.keys) == [s.key for s in expected]
    assert list(index.captions) == [s.caption.strip() for s in expected]
    assert index.labels.tolist() == [int(s.meta.get("label", -1)) for s in expected]
    for i, raw in enumerate(expected):
        assert index.sample(i).image == raw.image, raw.key
        assert index.locate(i).ext == raw.image_ext


@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    return write_messy_shard(tmp_path / "messy" / "shard-00000.tar").parent


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    out = write_synthetic(tmp_path / "syn", n_train=45, n_test=5, seed=3, shard_size=20)
    return out / "train"


def test_index_equals_sequential_reader_for_tar_shards(shards: Path, messy: Path) -> None:
    for extra in ("a.tar", "b.tar"):  # several shards, one with every kind of bad sample
        shutil.copy(messy / "shard-00000.tar", shards / extra)
    write_repeated_keys_shard(shards / "c.tar")
    assert len(sorted(shards.glob("*.tar"))) == 6
    index = SampleIndex.build(str(shards))
    expected = _valid(shards)
    _assert_same_samples(index, expected)
    assert index.captions == [s.caption.strip() for s in expected]  # a list-like: equal to a list
    assert index.info is not None and index.info.name == "synthetic-shapes"
    # The image member is the first image of the sample, and long (PAX) names keep their offsets.
    keys = list(index.keys)
    assert "three" in keys and "two" not in keys and ("deep/" + "x" * 120) in keys
    # A repeated key is in neither; members of one key that interleave with another's are.
    assert "a" not in keys and "c" not in keys and {"b", "d", "e"} <= set(keys)


def test_index_equals_sequential_reader_for_a_manifest(tmp_path: Path) -> None:
    manifest = write_manifest_dir(tmp_path / "m")
    index = SampleIndex.build(str(manifest))
    _assert_same_samples(index, _valid(manifest))
    assert [index.locate(i).offset for i in range(len(index))] == [0, 0, 0]
    assert index.locate(0).uri == str(tmp_path / "m" / "img" / "0.png")
    assert index.skipped.counts == {"missing_image": 1, "empty_caption": 1}
    assert index.labels.tolist() == [0, 1, -1]
    # The directory form of the same manifest is the same shard set: same cache.
    assert SampleIndex.build(str(tmp_path / "m")).location == index.location


def test_skips_counted_like_the_in_memory_loader(messy: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        index = SampleIndex.build(str(messy))
    loaded = ImageTextDataset.load(messy)
    assert index.skipped.counts == loaded.skipped.counts == {
        "corrupt_image": 2, "empty_caption": 1, "missing_caption": 1, "missing_image": 1}
    assert index.skipped.as_metrics()["data/skipped/total"] == 5
    assert "'corrupt'" in caplog.text and "corrupt_image" in caplog.text and "kept 6 samples, skipped 5" in caplog.text
    assert [s.key for s in loaded.samples] == list(index.keys)


@pytest.mark.parametrize("max_samples", [0, 1, 3, 5, 6, 100])
def test_max_samples_truncates_a_full_index(messy: Path, max_samples: int) -> None:
    counting = CountingMap()
    full = SampleIndex.build(str(messy), map_fn=counting)
    index = SampleIndex.build(str(messy), max_samples=max_samples, map_fn=counting)
    loaded = ImageTextDataset.load(messy, max_samples=max_samples)
    assert len(counting.files) == 1  # max_samples is not part of the cache's identity
    assert index.base_location == full.base_location
    assert len(index) == len(loaded) == min(max_samples, 6)
    assert list(index.keys) == [s.key for s in loaded.samples]
    # A sequential reader stops at the limit: only skips before it count.
    assert index.skipped.counts == loaded.skipped.counts
    # The limit travels with the location: whoever opens it sees the same samples.
    reopened = SampleIndex.open(index.location)
    assert len(reopened) == len(index) and reopened.skipped.counts == loaded.skipped.counts
    assert len(SampleIndex.open(full.location, max_samples=max_samples)) == len(index)
    assert len(SampleIndex.open(index.location, max_samples=2)) == min(2, len(index))
    with pytest.raises(ValueError, match="max_samples"):
        SampleIndex.build(str(messy), max_samples=-1)


def test_cache_is_reused_and_invalidated_when_a_shard_changes(shards: Path) -> None:
    counting = CountingMap()
    first = SampleIndex.build(str(shards), map_fn=counting)
    assert Path(first.location).parent == shards / INDEX_DIR
    assert len(counting.files) == 3
    again = SampleIndex.build(str(shards), map_fn=counting)
    assert len(counting.files) == 3 and again.location == first.location  # nothing re-read
    # Rewrite one shard: same name, different samples.
    target = sorted(shards.glob("*.tar"))[1]
    samples = [RawSample(f"new{i}", _png_bytes(i), "png", f"new caption {i}")
               for i in range(2)]
    (written,) = write_webdataset(samples, shards / "tmp", prefix="x")
    os.replace(written, target)
    changed = SampleIndex.build(str(shards), map_fn=counting)
    assert len(counting.files) == 6 and changed.location != first.location
    assert len(changed) == 45 - 20 + 2 and "new caption 1" in list(changed.captions)
    # A touched but identical shard also counts as changed (mtime is part of the identity).
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    SampleIndex.build(str(shards), map_fn=counting)
    assert len(counting.files) == 9


def _png_bytes(i: int) -> bytes:
    return png((i, 2 * i, 3 * i))


def test_an_unfinished_or_damaged_cache_is_rebuilt(shards: Path) -> None:
    counting = CountingMap()
    index = SampleIndex.build(str(shards), map_fn=counting)
    location = Path(index.location)
    (location / "meta.json").unlink()  # a build that died before its last write
    with pytest.raises(FileNotFoundError, match=str(location)):
        SampleIndex.open(str(location))
    assert len(SampleIndex.build(str(shards), map_fn=counting)) == 45 and len(counting.files) == 6
    with open(location / "captions.bin", "ab") as f:  # a file that does not match its meta
        f.write(b"junk")
    assert len(SampleIndex.build(str(shards), map_fn=counting)) == 45 and len(counting.files) == 9


def _block_index_dir(directory: Path) -> None:
    # A file where the cache directory would go makes the location unwritable, for root too.
    (directory / INDEX_DIR).write_text("not a directory")


def test_unwritable_location_falls_back_to_the_cache_dir(shards: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    _block_index_dir(shards)
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXPERTPAR_CACHE_DIR", str(cache))
    counting = CountingMap()
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        index = SampleIndex.build(str(shards), map_fn=counting)
    assert Path(index.location).parent == cache
    assert [r.message for r in caplog.records if "cannot write" in r.message] != []
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert SampleIndex.build(str(shards), map_fn=counting).location == index.location
    assert len(counting.files) == 3  # the fallback cache is found again
    assert list(SampleIndex.open(index.location).captions) == list(index.captions)


def test_unwritable_location_without_cache_dir_stays_in_memory(shards: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    _block_index_dir(shards)
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        index = SampleIndex.build(str(shards))
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "in memory" in warnings[0] and "EXPERTPAR_CACHE_DIR" in warnings[0]
    assert index.location.startswith("memory://") and len(index) == 45
    assert list(pickle.loads(pickle.dumps(index)).captions) == list(index.captions)
    with pytest.raises(ValueError, match="EXPERTPAR_CACHE_DIR"):
        SampleIndex.open(index.location)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_directory_falls_back(shards: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPERTPAR_CACHE_DIR", str(tmp_path / "cache"))
    shards.chmod(0o555)
    try:
        index = SampleIndex.build(str(shards))
    finally:
        shards.chmod(0o755)
    assert Path(index.location).parent == tmp_path / "cache"


def test_batch_is_identical_to_the_in_memory_dataset(shards: Path) -> None:
    index = SampleIndex.build(str(shards))
    loaded = ImageTextDataset.load(shards)
    train_tf, eval_tf = make_transform(24, train=True), make_transform(24, train=False)
    for idx, tf, seed in (([3, 1, 44, 3], train_tf, 11), ([0, 20], eval_tf, None)):
        images, captions, labels = index.batch(idx, tf, seed=seed)
        want_images, want_captions, want_labels = loaded.batch(idx, tf, seed=seed)
        assert images.dtype == torch.float32 and torch.equal(images, want_images)
        assert captions == want_captions and torch.equal(labels, want_labels)
    with pytest.raises(IndexError, match="45"):
        index.batch([45], eval_tf)
    with pytest.raises(ValueError, match="at least one"):
        index.batch([], eval_tf)
    assert index.sample(7) == loaded.samples[7]


def test_opened_index_is_memory_mapped_and_pickles_as_its_location(shards: Path) -> None:
    index = SampleIndex.build(str(shards))
    opened = SampleIndex.open(index.location)
    assert isinstance(opened._records, np.memmap) and RECORD_DTYPE.itemsize == 48
    assert len(pickle.dumps(opened)) < 1000  # the location, not the samples
    clone = pickle.loads(pickle.dumps(SampleIndex.open(index.location, max_samples=10)))
    assert len(clone) == 10 and list(clone.captions) == list(index.captions)[:10]


def test_file_uri_source_is_the_same_dataset(shards: Path) -> None:
    index = SampleIndex.build(str(shards))
    via_uri = SampleIndex.build(shards.as_uri())
    assert via_uri.location == index.location and via_uri.source == str(shards)
    tf = make_transform(16, train=True)
    assert torch.equal(via_uri.batch([2, 9], tf, seed=1)[0], index.batch([2, 9], tf, seed=1)[0])
    assert SampleIndex.build(shards.as_uri() + "/shard-*.tar").shards == index.shards


def test_compressed_shard_is_refused_but_still_readable_sequentially(tmp_path: Path) -> None:
    samples = [RawSample(f"k{i}", _png_bytes(i), "png", f"caption {i}") for i in range(3)]
    (plain,) = write_webdataset(samples, tmp_path / "plain")
    packed = tmp_path / "packed" / "shard-00000.tar"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert [s.caption for s in iter_samples(packed)] == ["caption 0", "caption 1", "caption 2"]
    with pytest.raises(ValueError, match=r"shard-00000\.tar is gzip-compressed.*uncompressed"):
        SampleIndex.build(str(packed))


def test_truncated_or_unreadable_shard_names_the_file(tmp_path: Path) -> None:
    samples = [RawSample(f"k{i}", b"x" * 1000, "png", "c") for i in range(4)]
    (shard,) = write_webdataset(samples, tmp_path / "w")
    for cut in (700, 2560, 2800):  # inside data, at a header boundary, inside a header
        partial = tmp_path / f"cut{cut}" / "partial.tar"
        partial.parent.mkdir()
        partial.write_bytes(shard.read_bytes()[:cut])
        with pytest.raises(ValueError, match="partial.tar"):
            scan_file(str(partial))
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match="broken.tar"):
        SampleIndex.build(str(broken))


def test_scan_returns_rows_not_image_bytes(shards: Path) -> None:
    first = sorted(shards.glob("*.tar"))[0]
    part = scan_file(str(first))
    payload = len(pickle.dumps(part))
    assert len(part.records) == 20 and payload < first.stat().st_size / 4


def test_a_100_kb_caption_is_skipped_and_a_non_utf8_one_kept(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    import tarfile

    from shard_helpers import add_member
    shard = tmp_path / "captions" / "000000.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "huge.png", png((10, 20, 30)))
        add_member(tar, "huge.txt", b"a red square " * 8_000)  # 104 kB
        add_member(tar, "latin1.png", png((40, 50, 60)))
        add_member(tar, "latin1.txt", "un carr\xe9 gris".encode("latin-1"))  # not UTF-8
        add_member(tar, "fine.png", png((70, 80, 90)))
        add_member(tar, "fine.txt", b"a grey square")
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        index = SampleIndex.build(str(shard.parent))
    loaded = ImageTextDataset.load(shard.parent)
    assert index.skipped.counts == loaded.skipped.counts == {"caption_too_long": 1}
    assert "'huge' (caption_too_long)" in caplog.text  # its key, in the log
    assert "103999 characters, over 16384" in caplog.text  # stripped of its last space
    assert list(index.keys) == [s.key for s in loaded.samples] == ["latin1", "fine"]
    # A stray byte costs one character, not the sample.
    assert index.captions[0] == "un carr\ufffd gris"


def test_a_repeated_key_is_one_duplicate_key_skip_in_the_index_and_the_loader(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shard = write_repeated_keys_shard(tmp_path / "dup" / "000000.tar")
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        index = SampleIndex.build(str(shard.parent))
    loaded = ImageTextDataset.load(shard.parent)
    assert index.skipped.counts == loaded.skipped.counts == {"duplicate_key": 2}
    assert index.skipped.as_metrics()["data/skipped/duplicate_key"] == 2
    assert list(index.keys) == [s.key for s in loaded.samples] == ["b", "d", "e"]
    # Logged with its key, its shard and the members that repeat.
    assert "'a' (duplicate_key)" in caplog.text and str(shard) in caplog.text
    assert "a.png x2, a.txt x2" in caplog.text and "c.png x2" in caplog.text
    # The skips sit where a sequential reader meets them: `a` before `b`, `c` after it.
    for max_samples, want in ((0, {}), (1, {"duplicate_key": 1}), (2, {"duplicate_key": 2})):
        limited = SampleIndex.open(index.location, max_samples=max_samples)
        assert limited.skipped.counts == want
        assert ImageTextDataset.load(shard.parent, max_samples=max_samples).skipped.counts == want


def _outside_manifest(tmp_path: Path) -> Path:
    # m/list.csv with two rows inside m/ and four that point at tmp_path/outside.png.
    (tmp_path / "outside.png").write_bytes(png((1, 1, 1)))
    (tmp_path / "m" / "img").mkdir(parents=True)
    (tmp_path / "m" / "img" / "0.png").write_bytes(png((10, 10, 10)))
    (tmp_path / "m" / "img" / "1.png").write_bytes(png((20, 20, 20)))
    manifest = tmp_path / "m" / "list.csv"
    outside = tmp_path / "outside.png"
    manifest.write_text("filepath,caption\n"
                        "img/0.png,inside\n"
                        "../outside.png,up one\n"
                        "img/../../outside.png,up and around\n"
                        f"{outside},absolute\n"
                        f"{outside.as_uri()},file uri\n"
                        f"{tmp_path / 'm' / 'img' / '.' / '1.png'},absolute but inside\n")
    return manifest


def test_manifest_rows_outside_its_directory_are_skipped_unread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from expertpar.data import storage
    manifest = _outside_manifest(tmp_path)
    read: list[str] = []
    real_read_bytes = storage.read_bytes

    def spy(uri):
        read.append(str(uri))
        return real_read_bytes(uri)
    monkeypatch.setattr(storage, "read_bytes", spy)
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        index = SampleIndex.build(str(manifest))
    loaded = ImageTextDataset.load(manifest)
    assert index.skipped.counts == loaded.skipped.counts == {"outside_manifest_dir": 4}
    assert list(index.keys) == [s.key for s in loaded.samples] == [
        "img/0.png", str(tmp_path / "m" / "img" / "." / "1.png")]
    assert index.locate(1).uri == str(tmp_path / "m" / "img" / "1.png")
    # Every image read is in m/ (the manifest itself is streamed, not read whole).
    assert read and all(Path(uri).is_relative_to(tmp_path / "m") for uri in read)
    # The log names each row as manifest:line.
    for line in (3, 4, 5, 6):
        assert f"{manifest}:{line}: image path" in caplog.text
    assert "(outside_manifest_dir)" in caplog.text


def test_tar_member_names_with_dotdot_or_absolute_paths_write_nothing_outside(tmp_path: Path) -> None:
    import tarfile

    from shard_helpers import add_member
    shard = tmp_path / "data" / "deep" / "000000.tar"
    shard.parent.mkdir(parents=True)
    absolute = f"/{tmp_path.name}-absolute/x"  # a directory that does not exist
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "../../escape.png", png((1, 2, 3)))
        add_member(tar, "../../escape.txt", b"a name that climbs out")
        add_member(tar, f"{absolute}.png", png((4, 5, 6)))
        add_member(tar, f"{absolute}.txt", b"an absolute name")
    before = set(tmp_path.rglob("*"))
    index = SampleIndex.build(str(shard.parent))
    loaded = ImageTextDataset.load(shard.parent)
    # Members are read in place from the tar, never extracted: the names are only keys.
    assert list(index.keys) == [s.key for s in loaded.samples] == ["../../escape", absolute]
    new = set(tmp_path.rglob("*")) - before
    assert new and all(p.relative_to(shard.parent).parts[0] == INDEX_DIR for p in new)
    assert not Path(absolute).parent.exists()
    # Writing them out again (a conversion) keeps every member inside the output directory.
    (out,) = write_webdataset(iter_samples(shard.parent), tmp_path / "out")
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["escape.png", "escape.json", f"{absolute[1:]}.png",
                                  f"{absolute[1:]}.json"]

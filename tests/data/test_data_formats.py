"""Tests for WebDataset / manifest readers and writers and source resolution."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from shard_helpers import write_repeated_keys_shard

from expertpar.data.formats import (
    RawSample,
    iter_manifest,
    iter_samples,
    iter_webdataset,
    list_shards,
    write_manifest,
    write_webdataset,
)
from expertpar.data.manifest import _image_uri


def _samples(n: int) -> list[RawSample]:
    return [RawSample(key=f"{i:09d}", image=bytes([i, 1, 2, 3]) * (i + 1), image_ext="png",
                      caption=f"caption number {i}", meta={"label": i % 3, "source": "unit"})
            for i in range(n)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_round_trip(tmp_path: Path) -> None:
    samples = _samples(7)
    shards = write_webdataset(samples, tmp_path / "wds", shard_size=3)
    assert [p.name for p in shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    back = list(iter_webdataset(shards))
    assert back == samples  # keys, bytes, ext, captions and meta all preserved
    assert list(iter_samples(tmp_path / "wds")) == samples


def test_webdataset_is_deterministic(tmp_path: Path) -> None:
    a = write_webdataset(_samples(5), tmp_path / "a", shard_size=10)
    b = write_webdataset(_samples(5), tmp_path / "b", shard_size=10)
    assert a[0].read_bytes() == b[0].read_bytes()
    with tarfile.open(a[0]) as tar:
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in tar.getmembers())
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_rewrite_removes_stale_shards(tmp_path: Path) -> None:
    write_webdataset(_samples(6), tmp_path, shard_size=2)
    write_webdataset(_samples(2), tmp_path, shard_size=2)
    assert [p.name for p in list_shards(tmp_path)] == ["shard-00000.tar"]


def test_writer_sanitises_dotted_keys(tmp_path: Path) -> None:
    sample = RawSample(key="imgs/a.b.png", image=b"x", image_ext=".PNG", caption="c")
    (shard,) = write_webdataset([sample], tmp_path)
    (back,) = iter_webdataset([shard])
    assert back.key == "imgs/a_b_png" and back.image == b"x" and back.image_ext == "png"


def test_img2dataset_layout_txt_cls_and_grouping(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "sub/000000001.jpg", b"img1")
        _add(tar, "sub/000000002.png", b"img2")
        _add(tar, "sub/000000001.txt", b"  a photo of a dog\n")  # not adjacent to its image
        _add(tar, "sub/000000001.json", json.dumps({"caption": "ignored", "url": "u"}).encode())
        _add(tar, "sub/000000001.cls", b"7\n")
        _add(tar, "sub/000000002.json", json.dumps({"caption": "from json", "label": 2}).encode())
        _add(tar, "sub/000000002.cls", b"5")  # json label wins
        _add(tar, "sub/000000002.npy", b"ignored")
        _add(tar, "sub/000000003.txt", b"caption without image")
        _add(tar, "sub/000000004.webp", b"image without caption")
    got = {s.key: s for s in iter_webdataset([shard])}
    assert list(got) == ["sub/000000001", "sub/000000002", "sub/000000003", "sub/000000004"]
    one, two, three, four = got.values()
    assert (one.image, one.image_ext, one.caption) == (b"img1", "jpg", "a photo of a dog")
    assert one.meta == {"url": "u", "label": 7}
    assert (two.caption, two.meta) == ("from json", {"label": 2})
    assert three.image is None and three.caption == "caption without image"
    assert four.caption is None and four.image_ext == "webp"


def test_unreadable_tar_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match="broken.tar"):
        list(iter_webdataset([bad]))


def test_reader_yields_a_repeated_key_unread_with_its_reason(tmp_path: Path) -> None:
    shard = write_repeated_keys_shard(tmp_path / "dup.tar")
    got = {s.key: s for s in iter_webdataset([shard])}
    assert list(got) == ["a", "b", "c", "d", "e"]  # one sample per key, in first-seen order
    for key in ("a", "c"):
        assert (got[key].image, got[key].caption, got[key].error[0]) == (None, None, "duplicate_key")
        assert str(shard) in got[key].error[1]
    # Members of d and e interleave: each still pairs up, and is not a repeat.
    assert (got["d"].caption, got["e"].caption) == ("a teal square", "a purple square")
    assert got["d"].error is None and got["e"].error is None


@pytest.mark.parametrize("base, cell, want", [
    ("/data/m", "img/a.png", "/data/m/img/a.png"),
    ("/data/m", "img/./x/../a.png", "/data/m/img/a.png"),
    ("/data/m", "/data/m/img/a.png", "/data/m/img/a.png"),
    ("/data/m", "file:///data/m/img/a.png", "/data/m/img/a.png"),
    ("/data/m", "../a.png", None),
    ("/data/m", "img/../../m2/a.png", None),  # a sibling that shares the name's prefix
    ("/data/m", "/data/m2/a.png", None),
    ("/data/m", "file:///etc/a.png", None),
    ("/data/m", "s3://b/data/m/a.png", None),
    ("s3://b/m", "img/a.png", "s3://b/m/img/a.png"),
    ("s3://b/m", "s3://b/m/img/a.png", "s3://b/m/img/a.png"),
    ("s3://b/m", "../a.png", None),
    ("s3://b/m", "/m/a.png", None),  # a local path is never in the bucket
    ("s3://b/m", "s3://b/m2/a.png", None),
    ("s3://b/m", "s3://other/m/a.png", None),
    ("s3://b/m", "gs://b/m/a.png", None),
    ("s3://b/m", "http://example.com/m/a.png", None),
])
def test_a_manifest_image_path_must_resolve_under_the_manifest_directory(base: str, cell: str,
                                                                       want: str | None) -> None:
    assert _image_uri(base, cell) == want


@pytest.mark.parametrize("cut", [700, 2560, 2800])  # inside data, at a header boundary, inside a header
def test_truncated_tar_is_an_error(tmp_path: Path, cut: int) -> None:
    samples = [RawSample(f"k{i}", b"x" * 1000, "png", "c") for i in range(4)]
    (shard,) = write_webdataset(samples, tmp_path / "w")
    partial = tmp_path / "partial.tar"
    partial.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ValueError, match="partial.tar"):
        list(iter_webdataset([partial]))


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_manifest_round_trip(tmp_path: Path, suffix: str) -> None:
    samples = _samples(4)
    samples[1] = RawSample(key="x", image=b"jpegdata", image_ext="jpg", caption='has, comma\tand "quote"',
                           meta={"label": 9})
    manifest = write_manifest(samples, tmp_path / "sub" / f"data{suffix}")
    text = manifest.read_text()
    assert text.splitlines()[0] == ("filepath,caption,label" if suffix == ".csv" else "filepath\tcaption\tlabel")
    assert (tmp_path / "sub" / "data_images").is_dir()
    back = list(iter_manifest(manifest))
    assert [s.image for s in back] == [s.image for s in samples]
    assert [s.caption for s in back] == [s.caption for s in samples]
    assert [s.meta["label"] for s in back] == [s.meta["label"] for s in samples]
    assert all(not Path(s.key).is_absolute() for s in back)  # relative paths
    assert back[1].image_ext == "jpg"
    assert [s.image for s in iter_samples(tmp_path / "sub")] == [s.image for s in samples]  # dir -> manifest


def test_manifest_relative_paths_extra_columns_and_missing_image(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"A")
    manifest = tmp_path / "m.tsv"
    manifest.write_text("filepath\tcaption\tsource\nimg/a.png\ta cat\tweb\nimg/missing.png\ta dog\tweb\n")
    a, missing = iter_manifest(manifest)
    assert (a.key, a.image, a.image_ext, a.caption, a.meta) == ("img/a.png", b"A", "png", "a cat", {"source": "web"})
    assert missing.image is None and missing.caption == "a dog"


def test_bad_manifest_header_names_file(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,text\na.png,hello\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*\['path', 'text'\]"):
        list(iter_manifest(manifest))


def test_list_shards_sources(tmp_path: Path) -> None:
    shards = write_webdataset(_samples(4), tmp_path / "d", shard_size=2)
    assert list_shards(tmp_path / "d") == shards
    assert list_shards(shards[1]) == [shards[1]]
    assert list_shards(str(tmp_path / "d" / "shard-*.tar")) == shards
    with pytest.raises(FileNotFoundError, match="nope"):
        list_shards(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="zzz"):
        list_shards(str(tmp_path / "d" / "zzz-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        list_shards(tmp_path / "empty")

"""Storage: listing rules for every kind of source, URIs, byte ranges; errors name the file."""
from __future__ import annotations

from pathlib import Path

import pytest

from expertpar.data import storage
from expertpar.data.formats import list_shards


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directory_lists_its_tars_sorted_else_its_one_manifest(tmp_path: Path) -> None:
    d = tmp_path / "d"
    tars = [_touch(d / f"s-{i}.tar") for i in (2, 0, 1, 10)]
    _touch(d / "notes.txt")
    _touch(d / "sub" / "deeper.tar")  # not listed: a directory source is not recursive
    _touch(d / "list.csv")  # tars win over a manifest
    assert storage.list_shards(d) == sorted(str(p) for p in tars)
    assert list_shards(d) == sorted(tars)  # formats.list_shards: Paths for local sources
    m = tmp_path / "m"
    manifest = _touch(m / "data.tsv")
    assert storage.list_shards(m) == [str(manifest)]
    _touch(m / "other.csv")
    with pytest.raises(ValueError, match=r"several manifests.*data\.tsv.*other\.csv"):
        storage.list_shards(m)


def test_single_files_globs_and_file_uris(tmp_path: Path) -> None:
    a = _touch(tmp_path / "a" / "shard-0.tar")
    b = _touch(tmp_path / "b" / "shard-1.tar")
    _touch(tmp_path / "a" / ".hidden-shard.tar")
    assert storage.list_shards(a) == [str(a)]
    assert storage.list_shards(a.as_uri()) == [str(a)]
    # Like glob.glob: '*' stays within a component and skips hidden names.
    assert storage.list_shards(str(tmp_path / "*" / "shard-*.tar")) == [str(a), str(b)]
    assert storage.list_shards(tmp_path.as_uri() + "/*/*.tar") == [str(a), str(b)]
    assert storage.list_shards(str(tmp_path / "a" / ".h*.tar")) == [str(tmp_path / "a" / ".hidden-shard.tar")]
    assert storage.list_shards(str(tmp_path / "[a]" / "*.tar")) == [str(a)]
    _touch(tmp_path / "a" / "list.csv")
    with pytest.raises(ValueError, match="both tar shards and manifests"):
        storage.list_shards(str(tmp_path / "a" / "*"))


def test_listing_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data source not found: .*nope"):
        storage.list_shards(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="matched no files: .*zzz"):
        storage.list_shards(str(tmp_path / "zzz-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty contains no .tar shards"):
        storage.list_shards(tmp_path / "empty")
    with pytest.raises(ValueError, match="notes.txt is not a directory, .tar shard"):
        storage.list_shards(_touch(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="unsupported URI scheme 'http'"):
        storage.list_shards("http://example.invalid/data")


def test_shard_stats_identify_content_versions(tmp_path: Path) -> None:
    shard = _touch(tmp_path / "s.tar", b"12345")
    (stat,) = storage.list_shard_stats(tmp_path)
    assert (stat.uri, stat.size) == (str(shard), 5) and stat.mtime_ns == shard.stat().st_mtime_ns


def test_reads_whole_ranges_and_streams(tmp_path: Path) -> None:
    f = _touch(tmp_path / "f.bin", bytes(range(256)) * 4)
    assert storage.read_bytes(f) == f.read_bytes()
    assert storage.read_bytes(f.as_uri()) == f.read_bytes()
    assert storage.read_range(f, 250, 10) == (bytes(range(250, 256)) + bytes(range(4)))
    with storage.open_input(f) as stream:
        assert stream.read(3) == b"\x00\x01\x02" and len(stream.read()) == 1021
    reader = storage.RangeReader(max_open=1)
    g = _touch(tmp_path / "g.bin", b"abcdef")
    assert [reader.read(str(f), 1, 2), reader.read(str(g), 2, 3), reader.read(str(f), 3, 1)] == [
        b"\x01\x02", b"cde", b"\x03"]
    with pytest.raises(ValueError, match=r"g\.bin: expected 10 bytes at offset 2, got 4"):
        storage.read_range(g, 2, 10)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_bytes(tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_range(tmp_path / "missing.bin", 0, 1)
    assert storage.read_bytes_if_file(tmp_path / "missing.bin") is None


def test_writes_are_atomic_and_paths_compose(tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.bin"
    with pytest.raises(RuntimeError):
        with storage.open_output(target) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    storage.write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole"
    storage.remove(target)
    storage.remove(target)  # already gone: fine
    assert not target.exists()
    assert storage.join("s3://bucket/a/", "b", "c.tar") == "s3://bucket/a/b/c.tar"
    assert storage.parent("s3://bucket/a/b.tar") == "s3://bucket/a"
    assert storage.parent("s3://bucket/b.tar") == "s3://bucket"
    assert storage.parent("s3://bucket") == "s3://bucket"
    assert storage.glob_base("gs://bucket/x/*/y.tar") == "gs://bucket/x"
    assert storage.is_remote("gs://b/k") and not storage.is_remote("file:///tmp/x")
    assert storage.normalize(Path("rel")) == str(Path.cwd() / "rel")

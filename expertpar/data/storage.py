"""Where data lives: local paths, ``file://``, ``s3://`` and ``gs://`` URIs behind one small API.

Every read and listing goes through pyarrow filesystems (``FileSystem.from_uri``, as Ray Data
does), so local tests exercise the same code that reads a bucket. A URI string is the name of a
file everywhere: local ones (plain paths and ``file://``) are normalised to absolute paths,
remote ones stay ``scheme://bucket/key``; errors name it.

S3-compatible endpoints (MinIO, Ceph, a test server) come from the standard environment
variables ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, credentials from
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, region from ``AWS_REGION``. pyarrow >= 15
reads the endpoint variables itself, older versions ignore them, so the endpoint is passed
explicitly here (path-style addressing, which such servers need).
"""
from __future__ import annotations

import fnmatch
import functools
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .fileio import atomic_open

REMOTE_SCHEMES = ("s3", "gs", "gcs")
MANIFEST_SUFFIXES = (".csv", ".tsv")
_GLOB_CHARS = set("*?[")
_STREAM_BUFFER = 8 << 20  # one ranged GET per 8 MiB when streaming a remote object
_HEAD_THREADS = 16  # concurrent metadata requests: each is a round trip, not bandwidth


@dataclass(frozen=True)
class FileStat:
    """A file's identity for cache fingerprints: where it is, how big, when last written, and
    (for object stores, whose mtimes have one-second resolution) its ETag."""

    uri: str
    size: int
    mtime_ns: int
    etag: str = ""


def scheme_of(uri: str | Path) -> str:
    """'' for a local path, else the lowercase URI scheme ('file', 's3', ...)."""
    text = str(uri)
    if "://" not in text:
        return ""
    return text.split("://", 1)[0].lower()


def is_remote(uri: str | Path) -> bool:
    """True for object-store URIs (s3://, gs://); False for local paths and file:// URIs."""
    scheme = scheme_of(uri)
    if scheme in ("", "file"):
        return False
    if scheme in REMOTE_SCHEMES:
        return True
    raise ValueError(f"unsupported URI scheme {scheme!r} in {uri}: use a local path, file://, "
                     f"s3:// or gs://")


def normalize(uri: str | Path) -> str:
    """Absolute local path for local/file:// sources (tasks may run elsewhere); URIs as given,
    without a trailing slash."""
    text = str(uri)
    if is_remote(text):
        return text.rstrip("/") if not text.endswith("://") else text
    if scheme_of(text) == "file":
        try:
            _, path = pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as exc:
            raise ValueError(f"invalid file URI {text}: {exc}") from exc
        return path
    return os.path.abspath(text)


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=32)
def _remote_filesystem(scheme: str, bucket: str, endpoint: str | None, region: str | None,
                       key_id: str | None) -> pafs.FileSystem:
    # Cached per bucket and environment: building an S3 client (and resolving a bucket's
    # region) costs network round trips, and image reads happen per sample. The env values
    # are part of the key so a changed endpoint or credential gets a new client.
    if scheme == "s3" and endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        return pafs.S3FileSystem(endpoint_override=parsed.netloc + parsed.path.rstrip("/"),
                                 scheme=parsed.scheme or "https",
                                 region=region or "us-east-1")
    filesystem, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return filesystem


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding `uri` and the path within it."""
    text = str(uri)
    if not is_remote(text):
        return pafs.LocalFileSystem(), normalize(text)
    scheme = scheme_of(text)
    parsed = urlparse(text)
    if not parsed.netloc:
        raise ValueError(f"URI {text} names no bucket")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    try:
        filesystem = _remote_filesystem(scheme, parsed.netloc, _s3_endpoint() if scheme == "s3" else None,
                                        region, os.environ.get("AWS_ACCESS_KEY_ID"))
    except (ValueError, OSError) as exc:
        raise OSError(f"cannot connect to the filesystem of {text}: {exc}") from exc
    path = (parsed.netloc + parsed.path).rstrip("/")
    return filesystem, path


def _uri_like(template: str, path: str) -> str:
    # Inverse of resolve(): the filesystem path of a listed entry as a URI of the same kind.
    if is_remote(template):
        return f"{scheme_of(template)}://{path}"
    return path


def join(base: str | Path, *names: str) -> str:
    """`base` / names, for local paths and URIs alike."""
    text = normalize(base)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(text, *names)


def parent(uri: str | Path) -> str:
    """The directory (prefix) containing `uri`; a bucket root is its own parent."""
    text = normalize(uri)
    if is_remote(text):
        head, _, rest = text.partition("://")
        bucket, _, key = rest.partition("/")
        return f"{head}://{bucket}/{key.rpartition('/')[0]}".rstrip("/") if key else text
    return os.path.dirname(text)


def basename(uri: str | Path) -> str:
    return normalize(uri).rstrip("/").rpartition("/")[2]


def _info(uri: str) -> pafs.FileInfo:
    filesystem, path = resolve(uri)
    try:
        return filesystem.get_file_info(path)
    except OSError as exc:
        raise OSError(f"cannot stat {uri}: {exc}") from exc


def _stat(uri_template: str, info: pafs.FileInfo) -> FileStat:
    return FileStat(_uri_like(uri_template, info.path), int(info.size or 0), int(info.mtime_ns or 0))


def stat(uri: str | Path) -> FileStat:
    """Size and mtime of a file; FileNotFoundError naming `uri` if it is not a file."""
    info = _info(str(uri))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"file not found: {uri}")
    return _stat(normalize(uri), info)


def exists(uri: str | Path) -> bool:
    return _info(str(uri)).type != pafs.FileType.NotFound


def is_file(uri: str | Path) -> bool:
    return _info(str(uri)).type == pafs.FileType.File


def _list(uri: str, *, recursive: bool) -> list[pafs.FileInfo]:
    filesystem, path = resolve(uri)
    try:
        return filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True,
                                                          recursive=recursive))
    except OSError as exc:
        raise OSError(f"cannot list {uri}: {exc}") from exc


def _suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()  # pathlib's rules: '.csv' alone has no suffix


def is_manifest(uri: str | Path) -> bool:
    return _suffix(basename(uri)) in MANIFEST_SUFFIXES


def is_glob(source: str | Path) -> bool:
    """True if `source` contains glob wildcards."""
    return any(c in _GLOB_CHARS for c in str(source))


def _sort_key(uri: str) -> list[str]:
    # pathlib orders paths component by component; keep that order (it is the data order).
    return uri.split("/")


def glob_base(pattern: str) -> str:
    """The directory part of a glob pattern before its first wildcard component."""
    head, sep, rest = pattern.partition("://") if "://" in pattern else ("", "", pattern)
    parts = rest.split("/")
    cut = next(i for i, p in enumerate(parts) if is_glob(p))
    base = "/".join(parts[:cut])
    if not base:
        base = "/" if rest.startswith("/") else "."
    return f"{head}{sep}{base}" if sep else base


def _glob(pattern: str) -> list[FileStat]:
    # glob.glob's rules, for every filesystem: '*' stays within one path component and
    # does not match a leading dot unless the pattern component starts with one.
    base = glob_base(pattern)
    prefix = normalize(base).rstrip("/")
    wanted = normalize(pattern)[len(prefix):].strip("/").split("/")
    matches = []
    for info in _list(base, recursive=len(wanted) > 1):
        if info.type != pafs.FileType.File:
            continue
        parts = info.path[len(resolve(base)[1].rstrip("/")):].strip("/").split("/")
        if len(parts) == len(wanted) and all(
                fnmatch.fnmatchcase(p, w) and (w.startswith(".") or not p.startswith("."))
                for p, w in zip(parts, wanted)):
            matches.append(_stat(prefix, info))
    return matches


def _etag(uri: str) -> str:
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_file(path) as f:  # a HEAD request: no data is read
            meta = f.metadata()
    except OSError as exc:
        raise OSError(f"cannot stat {uri}: {exc}") from exc
    return (meta.get("ETag") or meta.get("etag") or b"").decode("ascii", errors="replace")


def with_etags(stats: list[FileStat]) -> list[FileStat]:
    """`stats` with the ETags of remote files (concurrent HEAD requests); local ones unchanged."""
    remote = [s for s in stats if is_remote(s.uri)]
    if not remote:
        return stats
    with ThreadPoolExecutor(_HEAD_THREADS) as pool:
        etags = dict(zip((s.uri for s in remote), pool.map(_etag, [s.uri for s in remote])))
    return [replace(s, etag=etags[s.uri]) if s.uri in etags else s for s in stats]


def list_shard_stats(source: str | Path) -> list[FileStat]:
    """`list_shards` with each file's size and mtime (what a cache fingerprint needs)."""
    text = str(source)
    if is_glob(text):
        matches = sorted(_glob(text), key=lambda s: _sort_key(s.uri))
        if not matches:
            raise FileNotFoundError(f"data source pattern matched no files: {text}")
        if len({is_manifest(m.uri) for m in matches}) > 1:
            raise ValueError(f"data source pattern {text} matched both tar shards and manifests")
        return matches
    uri = normalize(text)
    info = _info(uri)
    shown = Path(text) if scheme_of(text) == "" else text
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source not found: {shown}")
    if info.type == pafs.FileType.Directory:
        files = sorted((_stat(uri, i) for i in _list(uri, recursive=False)
                        if i.type == pafs.FileType.File), key=lambda s: _sort_key(s.uri))
        tars = [f for f in files if basename(f.uri).endswith(".tar")]
        if tars:
            return tars
        manifests = [f for f in files if is_manifest(f.uri)]
        if len(manifests) == 1:
            return manifests
        if len(manifests) > 1:
            raise ValueError(f"data directory {shown} has no .tar shards and several manifests "
                             f"({[basename(m.uri) for m in manifests]}); name one explicitly")
        raise FileNotFoundError(f"data directory {shown} contains no .tar shards and no .csv/.tsv manifest")
    if _suffix(basename(uri)) == ".tar" or is_manifest(uri):
        return [_stat(uri, info)]
    raise ValueError(f"data source {shown} is not a directory, .tar shard or .csv/.tsv manifest")


def list_shards(source: str | Path) -> list[str]:
    """Resolve `source` (dir, .tar, .csv/.tsv or glob; local or URI) to the files to read, sorted.

    A directory means all `*.tar` in it, or its single manifest if it has no tars.
    """
    return [s.uri for s in list_shard_stats(source)]


def source_dir(source: str | Path) -> str:
    """The directory a source lives in: itself, its file's parent, or a glob's base."""
    text = str(source)
    if is_glob(text):
        return normalize(glob_base(text))
    uri = normalize(text)
    return uri if _info(uri).type == pafs.FileType.Directory else parent(uri)


@contextmanager
def open_input(uri: str | Path) -> Iterator[IO[bytes]]:
    """A buffered, forward-only binary stream over a whole file (large sequential reads)."""
    filesystem, path = resolve(uri)
    try:
        stream = filesystem.open_input_stream(path, buffer_size=_STREAM_BUFFER)
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {uri}") from None
    except OSError as exc:
        raise OSError(f"cannot open {uri}: {exc}") from exc
    with stream:
        yield stream


def read_bytes(uri: str | Path) -> bytes:
    """The whole file; FileNotFoundError / OSError naming `uri`."""
    if not is_file(uri):
        raise FileNotFoundError(f"file not found: {uri}")
    with open_input(uri) as f:
        try:
            return f.read()
        except OSError as exc:
            raise OSError(f"cannot read {uri}: {exc}") from exc


def read_bytes_if_file(uri: str | Path) -> bytes | None:
    """The whole file, or None when there is no file at `uri` (a manifest's missing image)."""
    return read_bytes(uri) if is_file(uri) else None


def read_range(uri: str | Path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset`; ValueError if the file is shorter than that."""
    return _read_at(_open_random(str(uri)), str(uri), offset, size)


def _open_random(uri: str):
    filesystem, path = resolve(uri)
    try:
        return filesystem.open_input_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {uri}") from None
    except OSError as exc:
        raise OSError(f"cannot open {uri}: {exc}") from exc


def _read_at(handle, uri: str, offset: int, size: int) -> bytes:
    try:
        data = handle.read_at(size, offset)
    except OSError as exc:
        raise OSError(f"cannot read {size} bytes at offset {offset} of {uri}: {exc}") from exc
    if len(data) != size:
        raise ValueError(f"{uri}: expected {size} bytes at offset {offset}, got {len(data)} "
                         f"(the file changed after it was indexed?)")
    return data


class RangeReader:
    """Byte-range reads that keep recently used files open (one open per shard, not per sample).

    Thread-safe: pyarrow's read_at is, and the handle table is guarded by a lock. Evicted
    handles close when the last reader drops them.
    """

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def _handle(self, uri: str):
        with self._lock:
            handle = self._handles.get(uri)
            if handle is not None:
                self._handles.move_to_end(uri)
                return handle
        handle = _open_random(uri)
        with self._lock:
            self._handles[uri] = handle
            while len(self._handles) > self.max_open:
                self._handles.popitem(last=False)
        return handle

    def read(self, uri: str, offset: int, size: int) -> bytes:
        return _read_at(self._handle(uri), uri, offset, size)


@contextmanager
def open_output(uri: str | Path) -> Iterator[IO[bytes]]:
    """Write a file: locally atomic (temp file + rename); an object store PUT is atomic itself."""
    if not is_remote(uri):
        with atomic_open(normalize(uri), "wb") as f:
            yield f
        return
    filesystem, path = resolve(uri)
    try:
        stream = filesystem.open_output_stream(path)
    except OSError as exc:
        raise OSError(f"cannot write {uri}: {exc}") from exc
    try:
        yield stream
    except BaseException:
        try:
            stream.close()  # readers ignore a partial object: index metadata is written last
        except OSError:
            pass
        raise
    try:
        stream.close()  # the upload happens (and fails) here
    except OSError as exc:
        raise OSError(f"cannot write {uri}: {exc}") from exc


def write_bytes(uri: str | Path, data: bytes) -> None:
    with open_output(uri) as f:
        f.write(data)


def remove(uri: str | Path) -> None:
    """Delete a file; a missing one is fine."""
    filesystem, path = resolve(uri)
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OSError(f"cannot delete {uri}: {exc}") from exc


CACHE_ENV = "EXPERTPAR_CACHE_DIR"


def scratch_root() -> str | None:
    """Where temporary local copies go: $EXPERTPAR_CACHE_DIR/tmp if set, else the system default."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        return None
    path = os.path.join(normalize(root), "tmp")
    os.makedirs(path, exist_ok=True)
    return path


@contextmanager
def local_copy(uri: str | Path) -> Iterator[Path]:
    """A local path with the file's content: the file itself if local, else a temporary copy."""
    if not is_remote(uri):
        yield Path(normalize(uri))
        return
    with tempfile.TemporaryDirectory(prefix="expertpar-", dir=scratch_root()) as tmp:
        local = Path(tmp) / (basename(uri) or "file")
        download(uri, local)
        yield local


def download(uri: str | Path, local_path: str | Path) -> None:
    """Copy a (possibly remote) file to a local path atomically."""
    with open_input(uri) as src, atomic_open(local_path, "wb") as dst:
        while chunk := src.read(_STREAM_BUFFER):
            dst.write(chunk)


__all__ = [
    "CACHE_ENV", "FileStat", "RangeReader", "basename", "download", "exists", "glob_base",
    "is_file", "is_glob", "is_manifest", "is_remote", "join", "list_shard_stats", "list_shards",
    "local_copy", "normalize", "open_input", "open_output", "parent", "read_bytes",
    "read_bytes_if_file", "read_range", "remove", "resolve", "scheme_of", "scratch_root",
    "source_dir", "stat", "with_etags", "write_bytes",
]

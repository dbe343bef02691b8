"""The sample index on disk: its files, writing them, checking them, and mapping them.

A location (a directory or object-store prefix, usually ``<source dir>/.expertpar-index/<fp>/``)
holds, all little-endian raw arrays so that opening is a memory map and memory stays flat as
the corpus grows:

    meta.json       format version, fingerprint, source, shards (uri, size, mtime, etag), sizes, skips
    samples.bin     RECORD_DTYPE per valid sample (48 bytes): offset, size, label, text ends, file, ext
    captions.bin    UTF-8 captions back to back (a record holds where its caption ends)
    keys.bin        UTF-8 sample keys back to back
    files.bin       UTF-8 file URIs back to back (the shards; for a manifest, its image files)
    file_ends.bin   uint64 end of each URI in files.bin
    skips.bin       SKIP_DTYPE per skipped sample

meta.json is written last and lists every file's size, so a location without it (or with a
file of another size) is an unfinished or damaged build and is ignored. A remote location is
copied to a local directory once per process and mapped from there.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from typing import IO

import numpy as np

from . import storage
from .errors import SkipStats
from .scan import RECORD_DTYPE, SKIP_DTYPE, ScannedFile

logger = logging.getLogger("expertpar")

# 2: keys repeated in a shard and manifest rows outside their directory became skips; an
# index built before that may hold such samples, so it is not reused.
FORMAT_VERSION = 2
META_FILE = "meta.json"
# file name -> dtype of its elements
ARRAYS: dict[str, np.dtype] = {
    "samples.bin": RECORD_DTYPE, "captions.bin": np.dtype("u1"), "keys.bin": np.dtype("u1"),
    "files.bin": np.dtype("u1"), "file_ends.bin": np.dtype("<u8"), "skips.bin": SKIP_DTYPE,
}


def fingerprint(shards: Iterable[storage.FileStat]) -> str:
    """Identity of a shard set (URIs, sizes, mtimes, ETags) under this index format."""
    record = {"format": FORMAT_VERSION,
              "shards": [[s.uri, s.size, s.mtime_ns, s.etag] for s in shards]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def writable(location: str) -> bool:
    """Whether files can be written at `location` (probed before any indexing work is spent:
    permissions, read-only mounts and object-store policies only show when writing)."""
    probe = storage.join(location, f".probe-{secrets.token_hex(6)}")
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except OSError as exc:
        logger.debug("index location %s is not writable: %s", location, exc)
        return False
    return True


class IndexWriter:
    """Appends ScannedFile results, in shard order, into the index arrays."""

    def __init__(self, sinks: dict[str, IO[bytes]]) -> None:
        self.sinks = sinks
        self.count = self.files = self.skips = 0
        self.caption_bytes = self.key_bytes = self.file_bytes = 0
        self.exts: dict[str, int] = {}
        self.skipped = SkipStats()

    def add(self, part: ScannedFile) -> None:
        records = part.records.copy()
        records["file"] += self.files
        records["caption_end"] += self.caption_bytes
        records["key_end"] += self.key_bytes
        ext_ids = np.array([self.exts.setdefault(e, len(self.exts)) for e in part.exts] or [0],
                           dtype=np.uint8)
        if len(self.exts) > 255:
            raise ValueError(f"over 255 distinct image extensions (at {part.uri}); the index stores at most 255")
        records["ext"] = ext_ids[records["ext"]]
        skips = part.skips.copy()
        skips["valid_before"] += self.count
        encoded = [f.encode("utf-8") for f in part.files]
        ends = self.file_bytes + np.cumsum([len(e) for e in encoded], dtype=np.uint64)
        self.sinks["samples.bin"].write(records.tobytes())
        self.sinks["captions.bin"].write(part.captions)
        self.sinks["keys.bin"].write(part.keys)
        self.sinks["files.bin"].write(b"".join(encoded))
        self.sinks["file_ends.bin"].write(ends.astype("<u8").tobytes())
        self.sinks["skips.bin"].write(skips.tobytes())
        self.count += len(records)
        self.files += len(encoded)
        self.skips += len(skips)
        self.caption_bytes += len(part.captions)
        self.key_bytes += len(part.keys)
        self.file_bytes += sum(len(e) for e in encoded)
        for name, n in part.skipped.counts.items():
            self.skipped.counts[name] = self.skipped.counts.get(name, 0) + n

    def meta(self, source: str, fp: str, shards: list[storage.FileStat]) -> dict:
        return {
            "format": FORMAT_VERSION, "fingerprint": fp, "source": source,
            "shards": [[s.uri, s.size, s.mtime_ns, s.etag] for s in shards],
            "count": self.count, "exts": list(self.exts),
            "sizes": {"samples.bin": self.count * RECORD_DTYPE.itemsize,
                      "captions.bin": self.caption_bytes, "keys.bin": self.key_bytes,
                      "files.bin": self.file_bytes, "file_ends.bin": self.files * 8,
                      "skips.bin": self.skips * SKIP_DTYPE.itemsize},
            "skipped": dict(self.skipped.counts),
        }


def arrays_from_buffers(buffers: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The index arrays of an index written to memory."""
    return {name: np.frombuffer(buffers[name], dtype=dtype) for name, dtype in ARRAYS.items()}


def map_local(directory: str, meta: dict) -> dict[str, np.ndarray]:
    """The index arrays of a complete local index, memory-mapped read-only."""
    arrays = {}
    for name, dtype in ARRAYS.items():
        size = meta["sizes"][name]
        # np.memmap cannot map an empty file; an empty array is the same thing.
        arrays[name] = (np.memmap(os.path.join(directory, name), dtype=dtype, mode="r",
                                  shape=(size // dtype.itemsize,))
                        if size else np.zeros(0, dtype=dtype))
    return arrays


def read_meta(location: str) -> dict | None:
    """The meta of a complete index at `location`, or None (absent, unfinished, other format)."""
    uri = storage.join(location, META_FILE)
    try:
        if not storage.is_file(uri):
            return None
        meta = json.loads(storage.read_bytes(uri).decode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        logger.warning("ignoring unreadable sample index %s: %s", uri, exc)
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        return None
    for name in ARRAYS:
        file = storage.join(location, name)
        if not storage.is_file(file) or storage.stat(file).size != meta["sizes"][name]:
            logger.warning("ignoring sample index %s: %s is missing or has the wrong size", location, name)
            return None
    return meta


_process_copies: dict[str, str] = {}  # remote index location -> local copy, for this process


def local_copy(location: str, meta: dict) -> str:
    """A local directory holding the remote index at `location`, downloaded once."""
    cached = _process_copies.get(location)
    if cached is not None and os.path.isfile(os.path.join(cached, META_FILE)):
        return cached
    root = os.environ.get(storage.CACHE_ENV)
    base = os.path.join(storage.normalize(root), "remote") if root else _process_tmp()
    directory = os.path.join(base, meta["fingerprint"])
    if read_meta(directory) is None:
        for name in ARRAYS:  # meta last: a reader never sees a half-copied index
            storage.download(storage.join(location, name), os.path.join(directory, name))
        storage.download(storage.join(location, META_FILE), os.path.join(directory, META_FILE))
    _process_copies[location] = directory
    return directory


_tmp_root: list[str] = []


def _process_tmp() -> str:
    if not _tmp_root:
        _tmp_root.append(tempfile.mkdtemp(prefix="expertpar-index-"))
        atexit.register(shutil.rmtree, _tmp_root[0], True)
    return _tmp_root[0]


__all__ = ["ARRAYS", "FORMAT_VERSION", "META_FILE", "IndexWriter", "arrays_from_buffers",
           "fingerprint", "local_copy", "map_local", "read_meta", "writable"]

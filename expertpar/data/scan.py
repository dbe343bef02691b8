"""Scan one tar shard or manifest into sample-index rows, validating every sample on the way.

`scan_file(uri)` is what `SampleIndex.build` maps over a source's files (as Ray tasks on the
Ray path), so it is a top-level function and its result, `ScannedFile`, holds only index rows,
captions, keys and skip records: never image bytes. Each image is decoded once here, so a
sample that is in the index is known to decode; training then reads it by byte offset.

A tar shard is read as one forward stream (one pass, no temporary copy, few large reads on an
object store); the members of a sample may be anywhere in the shard, as for `iter_webdataset`.
"""
from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import storage
from .errors import SkipStats
from .errors import SKIP_REASONS, SampleError
from .decode import decode_image
from .manifest import iter_manifest_rows
from .sample import IMAGE_EXTS, checked_caption, label_of
from .webdataset import (TEXT_EXTS, RepeatedMembers, caption_and_meta, check_not_truncated,
                         compression_of, first_image_ext, new_member)

logger = logging.getLogger("expertpar")

# One valid sample. Captions and keys live in byte blobs; a record holds where its text ends
# (it starts where the previous record's ends). `file` indexes the file table (the shards,
# or a manifest's image files), `ext` the table of image extensions. 48 bytes, aligned.
RECORD_DTYPE = np.dtype([("offset", "<u8"), ("size", "<u8"), ("label", "<i8"),
                         ("caption_end", "<u8"), ("key_end", "<u8"), ("file", "<u4"),
                         ("ext", "u1")], align=True)
# One skipped sample: how many valid samples came before it (so a max_samples view counts
# only the skips a sequential reader would have met) and its reason (index in SKIP_REASONS).
SKIP_DTYPE = np.dtype([("valid_before", "<u8"), ("reason", "u1")], align=True)


@dataclass
class ScannedFile:
    """Index rows of one scanned file; file/ext ids and text ends are local to it."""

    uri: str
    files: list[str]
    exts: list[str]
    records: np.ndarray  # RECORD_DTYPE
    captions: bytes
    keys: bytes
    skips: np.ndarray  # SKIP_DTYPE

    @property
    def skipped(self) -> SkipStats:
        stats = SkipStats()
        for code in self.skips["reason"].tolist():
            stats.add(SKIP_REASONS[code])
        return stats


class _Rows:
    """Accumulates one file's records and skips."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.files: dict[str, int] = {}
        self.exts: dict[str, int] = {}
        self.records: list[tuple] = []
        self.captions = bytearray()
        self.keys = bytearray()
        self.skips: list[tuple[int, int]] = []

    def add(self, file_uri: str, offset: int, size: int, label: int, caption: str, key: str,
            ext: str) -> None:
        file_id = self.files.setdefault(file_uri, len(self.files))
        ext_id = self.exts.setdefault(ext, len(self.exts))
        self.captions += caption.encode("utf-8")
        self.keys += key.encode("utf-8")
        self.records.append((offset, size, label, len(self.captions), len(self.keys), file_id, ext_id))

    def skip(self, key: str, error: SampleError) -> None:
        logger.warning("skipping sample %r (%s): %s", key, error.reason, error)
        self.skips.append((len(self.records), SKIP_REASONS.index(error.reason)))

    def result(self) -> ScannedFile:
        if len(self.exts) > 255:
            raise ValueError(f"{self.uri}: {len(self.exts)} distinct image extensions; "
                             f"the index stores at most 255")
        return ScannedFile(self.uri, list(self.files), list(self.exts),
                           np.array(self.records, dtype=RECORD_DTYPE), bytes(self.captions),
                           bytes(self.keys), np.array(self.skips, dtype=SKIP_DTYPE))


def _decode_error(data: bytes, key: str) -> SampleError | None:
    try:
        decode_image(data, key=key)
    except SampleError as exc:
        return exc
    return None


class _Image(NamedTuple):
    offset: int
    size: int
    error: SampleError | None


def _scan_members(uri: str, size: int) -> tuple[dict[str, dict], RepeatedMembers]:
    # key -> {ext: _Image for the sample's image, bytes for text members, None otherwise},
    # first member per (key, ext) kept, later ones counted as repeats, and insertion order =
    # first appearance, exactly as iter_webdataset groups them.
    groups: dict[str, dict] = {}
    repeats = RepeatedMembers()
    members = 0
    with storage.open_input(uri) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")
            for member in tar:
                members += 1
                named = new_member(member, groups, repeats)
                if named is None:
                    continue
                key, ext = named
                exts = groups[key]
                if ext in IMAGE_EXTS and first_image_ext(exts) is None:
                    data = tar.extractfile(member).read()
                    exts[ext] = _Image(member.offset_data, member.size, _decode_error(data, key))
                elif ext in TEXT_EXTS:
                    exts[ext] = tar.extractfile(member).read()
                else:
                    exts[ext] = None  # a second image or another member: not read
            end = tar.offset
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"cannot read tar shard {uri}: {exc}") from exc
    check_not_truncated(uri, size, end, members)
    return groups, repeats


def scan_tar(uri: str) -> ScannedFile:
    """Index rows of an uncompressed tar shard; ValueError names a compressed or broken one."""
    size = storage.stat(uri).size
    kind = compression_of(storage.read_range(uri, 0, min(size, 6)))
    if kind is not None:
        raise ValueError(f"tar shard {uri} is {kind}-compressed: the sample index reads images "
                         f"by byte offset, which needs uncompressed .tar shards; decompress it "
                         f"first (e.g. `{'gunzip' if kind == 'gzip' else 'un' + kind} -c`)")
    rows = _Rows(uri)
    groups, repeats = _scan_members(uri, size)
    for key, exts in groups.items():
        duplicate = repeats.error(uri, key)
        if duplicate is not None:
            rows.skip(key, SampleError(*duplicate))
            continue
        image_ext = first_image_ext(exts)
        caption, meta = caption_and_meta(uri, key, exts, exts.__getitem__)  # text exts hold bytes
        try:
            caption = checked_caption(key, caption, has_image=image_ext is not None)
            image = exts[image_ext]  # an _Image: the first image member of the sample
            if image.error is not None:
                raise image.error
        except SampleError as exc:
            rows.skip(key, exc)
            continue
        rows.add(uri, image.offset, image.size, label_of(key, meta), caption, key, image_ext)
    return rows.result()


def scan_manifest(uri: str) -> ScannedFile:
    """Index rows of a manifest: each row's image is its own file (offset 0, whole size)."""
    rows = _Rows(uri)
    for row in iter_manifest_rows(uri):
        image = storage.read_bytes_if_file(row.image_uri) if row.image_uri else None
        try:
            if row.error is not None:
                raise SampleError(*row.error)
            caption = checked_caption(row.key, row.caption, has_image=image is not None)
            decode_image(image, key=row.key)
        except SampleError as exc:
            rows.skip(row.key, exc)
            continue
        rows.add(row.image_uri, 0, len(image), label_of(row.key, row.meta), caption, row.key,
                 row.image_ext or "")
    return rows.result()


def scan_file(uri: str) -> ScannedFile:
    """Index rows of one file of a source (a tar shard or a manifest)."""
    return scan_manifest(uri) if storage.is_manifest(uri) else scan_tar(uri)


__all__ = ["RECORD_DTYPE", "SKIP_DTYPE", "ScannedFile", "scan_file", "scan_manifest", "scan_tar"]

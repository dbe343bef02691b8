"""Sample formats: resolve a data source to shards/manifests and read or write them.

The readers/writers live in `webdataset.py` and `manifest.py`, listing in `storage.py`; this
module is the one place that decides what a `source` string means.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from . import storage
from .manifest import iter_manifest, write_manifest
from .sample import IMAGE_EXTS, RawSample
from .storage import MANIFEST_SUFFIXES, is_glob
from .webdataset import iter_webdataset, write_webdataset


def list_shards(source: str | Path) -> list[Path] | list[str]:
    """Resolve `source` (dir, .tar, .csv/.tsv or glob) to the files to read, sorted.

    A directory means all `*.tar` in it, or its single manifest if it has no tars. Local
    sources (plain paths, file:// URIs) give absolute Paths, s3:// and gs:// sources URIs.
    """
    shards = storage.list_shards(source)
    return shards if storage.is_remote(source) else [Path(p) for p in shards]


def iter_samples(source: str | Path) -> Iterator[RawSample]:
    """Yield every RawSample of `source` in a deterministic order."""
    for path in list_shards(source):
        if storage.is_manifest(path):
            yield from iter_manifest(path)
        else:
            yield from iter_webdataset([path])


__all__ = [
    "IMAGE_EXTS", "MANIFEST_SUFFIXES", "RawSample", "is_glob", "iter_manifest", "iter_samples",
    "iter_webdataset", "list_shards", "write_manifest", "write_webdataset",
]

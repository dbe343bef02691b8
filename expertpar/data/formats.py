"""Sample formats: resolve a data source to shards/manifests and read or write them.

The readers/writers live in `webdataset.py` and `manifest.py`; this module is the one
place that decides what a `source` string means.
"""
from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

from expertpar.data.manifest import iter_manifest, write_manifest
from expertpar.data.sample import IMAGE_EXTS, RawSample
from expertpar.data.webdataset import iter_webdataset, write_webdataset

MANIFEST_SUFFIXES = (".csv", ".tsv")
_GLOB_CHARS = set("*?[")


def is_glob(source: str | Path) -> bool:
    """True if `source` contains glob wildcards."""
    return any(c in _GLOB_CHARS for c in str(source))


def _is_manifest(path: Path) -> bool:
    return path.suffix.lower() in MANIFEST_SUFFIXES


def list_shards(source: str | Path) -> list[Path]:
    """Resolve `source` (dir, .tar, .csv/.tsv or glob) to the files to read, sorted.

    A directory means all `*.tar` in it, or its single manifest if it has no tars.
    """
    text = str(source)
    if is_glob(text):
        matches = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"data source pattern matched no files: {text}")
        kinds = {_is_manifest(p) for p in matches}
        if len(kinds) > 1:
            raise ValueError(f"data source pattern {text} matched both tar shards and manifests")
        return matches
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    if path.is_dir():
        tars = sorted(p for p in path.glob("*.tar") if p.is_file())
        if tars:
            return tars
        manifests = sorted(p for p in path.iterdir() if p.is_file() and _is_manifest(p))
        if len(manifests) == 1:
            return manifests
        if len(manifests) > 1:
            raise ValueError(f"data directory {path} has no .tar shards and several manifests "
                             f"({[m.name for m in manifests]}); name one explicitly")
        raise FileNotFoundError(f"data directory {path} contains no .tar shards and no .csv/.tsv manifest")
    if path.suffix.lower() == ".tar" or _is_manifest(path):
        return [path]
    raise ValueError(f"data source {path} is not a directory, .tar shard or .csv/.tsv manifest")


def iter_samples(source: str | Path) -> Iterator[RawSample]:
    """Yield every RawSample of `source` in a deterministic order."""
    for path in list_shards(source):
        if _is_manifest(path):
            yield from iter_manifest(path)
        else:
            yield from iter_webdataset([path])


__all__ = [
    "IMAGE_EXTS", "RawSample", "is_glob", "iter_manifest", "iter_samples", "iter_webdataset",
    "list_shards", "write_manifest", "write_webdataset",
]

"""A dataset as an index of samples: where each valid sample's image lies, its caption and label.

Built once per shard set (every sample validated, skips counted by reason) and cached next to
the shards in ``<source dir>/.expertpar-index/<fingerprint>/``. The fingerprint covers the
shard list with sizes, mtimes (and ETags on object stores) and the format version, so a
changed shard means a new index; max_samples is applied when opening, not part of it. Where
that directory cannot be written, the index goes to ``$EXPERTPAR_CACHE_DIR/<fingerprint>``
or, without that variable, stays in memory (one warning says so). The files are described in
`index_files.py`.

An opened index is memory-mapped arrays: nothing per sample lives in Python objects, and
images are read by byte offset when a batch asks for them.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from functools import cached_property
from io import BytesIO
from typing import IO, NamedTuple

import numpy as np
import torch

from . import storage
from .catalog import DatasetInfo, find_dataset_info
from .dataset import SkipStats, StoredSample, combine_seed
from .errors import SKIP_REASONS
from .images import Transform, apply_transform, decode_image
from .index_files import (ARRAYS, FORMAT_VERSION, META_FILE, IndexWriter, arrays_from_buffers,
                          fingerprint, local_copy, map_local, read_meta, writable)
from .scan import ScannedFile, scan_file

logger = logging.getLogger("expertpar")

INDEX_DIR = ".expertpar-index"
MEMORY_PREFIX = "memory://"
# A truncated view's location carries its limit, so that open(index.location) anywhere (a Ray
# worker, an eval pass) sees the same samples as the process that built it.
_LIMIT_MARK = "#max_samples="
_READ_THREADS = 16  # concurrent object-store GETs per batch: latency, not bandwidth, bounds them


class SampleLocation(NamedTuple):
    """Where one sample's encoded image lies: `size` bytes at `offset` of `uri`."""

    uri: str
    offset: int
    size: int
    ext: str


class StringTable(Sequence):
    """Read-only list of strings over a UTF-8 blob and end offsets; decodes on access."""

    def __init__(self, blob: np.ndarray, ends: np.ndarray) -> None:
        self._blob = blob
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} strings")
        i %= n
        start = int(self._ends[i - 1]) if i else 0
        return self._blob[start:int(self._ends[i])].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"StringTable({len(self)} strings)"


class SampleIndex:
    """The samples of one source, as an index: len, captions, labels, sample(i), batch(...).

    Image bytes are read by offset when asked for; nothing per sample lives in Python objects.
    """

    def __init__(self, location: str, meta: dict, arrays: dict[str, np.ndarray], *,
                 max_samples: int | None = None) -> None:
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples}")
        self.base_location = location
        self.meta = meta
        self._arrays = arrays
        self._records = arrays["samples.bin"]
        self._n = len(self._records) if max_samples is None else min(max_samples, len(self._records))
        self._max_samples = max_samples
        self._reader = storage.RangeReader()
        self._pool: ThreadPoolExecutor | None = None

    # ---- building and opening ------------------------------------------------------------

    @classmethod
    def build(cls, source: str, *, max_samples: int | None = None,
              map_fn: Callable[[Callable[[str], ScannedFile], list[str]], Iterable[ScannedFile]] = map,
              ) -> SampleIndex:
        """The index of `source`: the cached one if its shards are unchanged, else built now.

        `map_fn(scan_file, shard_uris)` scans the files (in order); pass a parallel map (Ray
        tasks) for big corpora. `max_samples` keeps the first N valid samples (the cache
        always covers the whole shard set).
        """
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples}")
        shards = storage.with_etags(storage.list_shard_stats(source))
        fp = fingerprint(shards)
        candidates = [storage.join(storage.source_dir(source), INDEX_DIR, fp)]
        if os.environ.get(storage.CACHE_ENV):
            candidates.append(storage.join(os.environ[storage.CACHE_ENV], fp))
        for location in candidates:
            meta = read_meta(location)
            if meta is not None and meta.get("fingerprint") == fp:
                logger.info("%s: using the sample index at %s", source, location)
                return cls._report(cls.open(location, max_samples=max_samples), source)
        target = next((loc for loc in candidates if writable(loc)), None)
        if target is None:
            logger.warning("%s: cannot write the sample index to %s; keeping it in memory (set "
                           "%s to a writable directory to cache it)", source,
                           " or ".join(candidates), storage.CACHE_ENV)
        elif target != candidates[0]:
            logger.warning("%s: cannot write the sample index next to the shards (%s); "
                           "caching it in %s", source, candidates[0], target)
        logger.info("%s: indexing %d files", source, len(shards))
        parts = map_fn(scan_file, [s.uri for s in shards])
        index = cls._write(parts, target, storage.normalize(source), fp, shards, max_samples)
        return cls._report(index, source)

    @classmethod
    def _write(cls, parts: Iterable[ScannedFile], target: str | None, source: str, fp: str,
               shards: list[storage.FileStat], max_samples: int | None) -> SampleIndex:
        with ExitStack() as stack:
            memory = {name: BytesIO() for name in ARRAYS} if target is None else {}
            sinks: dict[str, IO[bytes]] = dict(memory) or {
                name: stack.enter_context(storage.open_output(storage.join(target, name)))
                for name in ARRAYS}
            writer = IndexWriter(sinks)
            for part in parts:
                writer.add(part)
            meta = writer.meta(source, fp, shards)
            if memory:
                arrays = arrays_from_buffers({n: b.getvalue() for n, b in memory.items()})
                return cls(MEMORY_PREFIX + fp, meta, arrays, max_samples=max_samples)
        storage.write_bytes(storage.join(target, META_FILE),
                            json.dumps(meta, indent=1).encode("utf-8"))
        return cls.open(target, max_samples=max_samples)

    @property
    def location(self) -> str:
        """Where this index is, for `SampleIndex.open` (with the max_samples limit, if any)."""
        if self._max_samples is None:
            return self.base_location
        return f"{self.base_location}{_LIMIT_MARK}{self._max_samples}"

    @classmethod
    def open(cls, location: str, *, max_samples: int | None = None) -> SampleIndex:
        """Open a built index from its location (`index.location`): a memory map, no scan.

        `max_samples` (or a limit carried by the location) keeps the first N samples.
        """
        base, mark, limit = location.rpartition(_LIMIT_MARK)
        if mark and limit.isdigit():
            location = base
            max_samples = int(limit) if max_samples is None else min(max_samples, int(limit))
        if location.startswith(MEMORY_PREFIX):
            raise ValueError(f"sample index {location} was kept in memory by the process that "
                             f"built it (its shard directory was not writable); set "
                             f"{storage.CACHE_ENV} to a directory all workers can read")
        location = storage.normalize(location)
        meta = read_meta(location)
        if meta is None:
            raise FileNotFoundError(f"no complete sample index (format {FORMAT_VERSION}) at {location}")
        local = local_copy(location, meta) if storage.is_remote(location) else location
        return cls(location, meta, map_local(local, meta), max_samples=max_samples)

    @staticmethod
    def _report(index: SampleIndex, source: str) -> SampleIndex:
        skipped = index.skipped
        if skipped.total:
            logger.warning("%s: kept %d samples, skipped %d (%s)", source, len(index), skipped.total,
                           ", ".join(f"{r}={n}" for r, n in sorted(skipped.counts.items())))
        return index

    def __reduce__(self):
        # Pickling sends where the index is, not its arrays (unless it only exists in memory).
        if self.base_location.startswith(MEMORY_PREFIX):
            return (_from_arrays, (self.base_location, self.meta,
                                   {k: np.asarray(v) for k, v in self._arrays.items()},
                                   self._max_samples))
        return (_reopen, (self.base_location, self._max_samples))

    # ---- what eval and training read -----------------------------------------------------

    def __len__(self) -> int:
        return self._n

    @property
    def source(self) -> str:
        return self.meta["source"]

    @property
    def shards(self) -> list[str]:
        return [shard[0] for shard in self.meta["shards"]]

    @cached_property
    def skipped(self) -> SkipStats:
        """Skipped samples by reason (for a max_samples view: those met before its end)."""
        skips = self._arrays["skips.bin"]
        reasons = skips["reason"][skips["valid_before"] < self._n] if len(skips) else []
        counts = np.bincount(np.asarray(reasons, dtype=np.int64), minlength=len(SKIP_REASONS))
        return SkipStats({SKIP_REASONS[r]: int(c) for r, c in enumerate(counts) if c})

    @cached_property
    def info(self) -> DatasetInfo | None:
        """dataset.json of the source (its directory or up to 2 parents), if there is one."""
        return find_dataset_info(self.source)

    @property
    def captions(self) -> StringTable:
        return StringTable(self._arrays["captions.bin"], self._records["caption_end"][:self._n])

    @property
    def keys(self) -> StringTable:
        return StringTable(self._arrays["keys.bin"], self._records["key_end"][:self._n])

    @property
    def labels(self) -> torch.Tensor:
        """int64 labels (-1 = unknown), one per sample."""
        return torch.from_numpy(np.array(self._records["label"][:self._n], dtype=np.int64))

    def _check(self, index: int) -> int:
        if not 0 <= index < self._n:
            raise IndexError(f"sample index {index} out of range for a dataset of {self._n}")
        return int(index)

    def locate(self, index: int) -> SampleLocation:
        """Where sample `index`'s image lies."""
        record = self._records[self._check(index)]
        file = int(record["file"])
        ends = self._arrays["file_ends.bin"]
        start = int(ends[file - 1]) if file else 0
        uri = self._arrays["files.bin"][start:int(ends[file])].tobytes().decode("utf-8")
        return SampleLocation(uri, int(record["offset"]), int(record["size"]),
                              self.meta["exts"][int(record["ext"])])

    def _caption(self, index: int) -> str:
        ends = self._records["caption_end"]
        start = int(ends[index - 1]) if index else 0
        return self._arrays["captions.bin"][start:int(ends[index])].tobytes().decode("utf-8")

    def _key(self, index: int) -> str:
        ends = self._records["key_end"]
        start = int(ends[index - 1]) if index else 0
        return self._arrays["keys.bin"][start:int(ends[index])].tobytes().decode("utf-8")

    def read_images(self, indices: Sequence[int]) -> list[bytes]:
        """Encoded image bytes of `indices`, read by offset (concurrently from an object store)."""
        places = [self.locate(i) for i in indices]
        read = lambda p: self._reader.read(p.uri, p.offset, p.size)  # noqa: E731
        if len(places) > 1 and any(storage.is_remote(p.uri) for p in places):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="expertpar-read")
            return list(self._pool.map(read, places))
        return [read(p) for p in places]

    def sample(self, index: int) -> StoredSample:
        """Sample `index` with its encoded image bytes."""
        index = self._check(index)
        (image,) = self.read_images([index])
        return StoredSample(self._key(index), image, self._caption(index),
                            int(self._records[index]["label"]))

    def batch(self, indices: Sequence[int], transform: Transform, *,
              seed: int | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """images_BCHW float32, captions, labels_B int64 for the given sample indices.

        Same contract as ImageTextDataset.batch: with `seed`, sample i is augmented with seed
        `combine_seed(seed, i)`, independent of batch composition and global RNG state.
        """
        if len(indices) == 0:
            raise ValueError("batch() needs at least one index")
        checked = [self._check(i) for i in indices]
        images = []
        for index, data in zip(checked, self.read_images(checked)):
            image = decode_image(data, key=self._key(index))
            images.append(apply_transform(transform, image,
                                          seed=None if seed is None else combine_seed(seed, index)))
        labels = [int(self._records[i]["label"]) for i in checked]
        return (torch.stack(images), [self._caption(i) for i in checked],
                torch.tensor(labels, dtype=torch.int64))

    def __repr__(self) -> str:
        return f"SampleIndex({self.source!r}, {self._n} samples, at {self.location!r})"


def _reopen(location: str, max_samples: int | None) -> SampleIndex:
    return SampleIndex.open(location, max_samples=max_samples)


def _from_arrays(location: str, meta: dict, arrays: dict[str, np.ndarray],
                 max_samples: int | None) -> SampleIndex:
    return SampleIndex(location, meta, arrays, max_samples=max_samples)


__all__ = ["FORMAT_VERSION", "INDEX_DIR", "SampleIndex", "SampleLocation", "StringTable", "fingerprint"]

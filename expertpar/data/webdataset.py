"""WebDataset tar shards (img2dataset layout): read and deterministic write."""
from __future__ import annotations

import io
import json
import logging
import tarfile
import zlib
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path

from . import storage
from .fileio import atomic_open
from .sample import IMAGE_EXTS, RawSample

logger = logging.getLogger("expertpar")


def split_member_name(name: str) -> tuple[str, str]:
    """Split `dir/000012.ext.more` into key `dir/000012` and extension `ext.more` (lowercase).

    img2dataset keys never contain dots, so the key ends at the first dot of the basename.
    """
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


TEXT_EXTS: tuple[str, ...] = ("json", "txt", "cls")  # the members a sample's caption/meta come from


def member_key(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, ext) of a sample member, or None for members that belong to no sample."""
    if not member.isfile():
        return None
    key, ext = split_member_name(member.name)
    if not key or key.endswith("/") or not ext:
        return None  # hidden files like `._foo` or extension-less members
    return key, ext


class RepeatedMembers:
    """The (key, ext) members that occur more than once in one shard, and how often.

    What "a repeated key" means: a key one of whose members, the same (key, ext), occurs
    twice or more in the shard (`a.jpg a.txt b.jpg b.txt a.jpg a.txt`, adjacent or not).
    A key that merely comes back with another extension (`a.jpg b.jpg a.txt`) is not
    repeated: members of one sample may lie anywhere in a shard (writers that interleave),
    and they pair up. Once a member repeats, two samples share the key and nothing tells
    which caption goes with which image (the first `.jpg` and the first `.txt` may come
    from different samples), so no "first occurrence" can be kept without risking a wrong
    pair: every member of the key is dropped and the key counts once as `duplicate_key`.
    The sample index (scan.py) and the streaming reader both use this class, so both see
    the same samples and the same skips.
    """

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}  # key -> ext -> occurrences (>= 2)

    def add(self, key: str, ext: str) -> None:
        """Record one more occurrence of (key, ext), already met earlier in the shard."""
        exts = self._counts.setdefault(key, {})
        exts[ext] = exts.get(ext, 1) + 1

    def error(self, shard: str | Path, key: str) -> tuple[str, str] | None:
        """('duplicate_key', message naming the shard and the repeated members), or None."""
        exts = self._counts.get(key)
        if not exts:
            return None
        repeated = ", ".join(f"{key}.{ext} x{n}" for ext, n in exts.items())
        return ("duplicate_key", f"sample {key!r}: key repeated in tar shard {shard} "
                f"({repeated}); which member belongs to which sample is unknown, so none is used")


def _group_members(tar: tarfile.TarFile) -> tuple[dict[str, dict[str, tarfile.TarInfo]],
                                                  RepeatedMembers]:
    # Group by key over the whole shard (not just adjacent runs) so shards written by
    # tools that interleave members still pair up; insertion order = first appearance.
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    repeats = RepeatedMembers()
    for member in tar.getmembers():
        named = new_member(member, groups, repeats)
        if named is not None:
            groups[named[0]][named[1]] = member
    return groups, repeats


def new_member(member: tarfile.TarInfo, groups: dict[str, dict],
               repeats: RepeatedMembers) -> tuple[str, str] | None:
    """The (key, ext) of a sample's member met for the first time (its key's group made in
    ``groups``, in first-appearance order), else None: not a sample's member, or a repeat
    (counted in ``repeats``). The one rule of both readers: the streaming one here and the
    index scan (scan.py) group a shard identically."""
    named = member_key(member)
    if named is None:
        return None
    key, ext = named
    if ext in groups.setdefault(key, {}):
        repeats.add(key, ext)
        return None
    return key, ext


def first_image_ext(exts: Iterable[str]) -> str | None:
    """The sample's image member: the first image extension in member order."""
    return next((ext for ext in exts if ext in IMAGE_EXTS), None)


def _text(data: bytes) -> str:
    # A stray invalid byte should cost one character, not the sample.
    return data.decode("utf-8", errors="replace")


def caption_and_meta(shard: str | Path, key: str, exts: Container[str],
                     read: Callable[[str], bytes]) -> tuple[str | None, dict]:
    """Caption and metadata of one sample from its json/txt/cls members (`read(ext)` -> bytes).

    `.txt` wins over the json caption, a json `label` over `.cls`.
    """
    caption: str | None = None
    meta: dict = {}
    if "json" in exts:
        try:
            obj = json.loads(_text(read("json")))
        except json.JSONDecodeError as exc:
            obj = None
            logger.warning("%s: %s.json is not valid JSON (%s); ignoring it", shard, key, exc)
        if isinstance(obj, dict):
            meta = {k: v for k, v in obj.items() if k != "caption"}
            cap = obj.get("caption")
            caption = cap if isinstance(cap, str) else None
        elif obj is not None:
            logger.warning("%s: %s.json is not a JSON object; ignoring it", shard, key)
    if "txt" in exts:
        caption = _text(read("txt")).strip()
    if "cls" in exts and "label" not in meta:
        try:
            meta["label"] = int(_text(read("cls")).strip())
        except ValueError:
            pass  # non-integer class files are not labels we can use
    return caption, meta


def _sample_from_group(tar: tarfile.TarFile, shard: str | Path, key: str,
                       members: dict[str, tarfile.TarInfo]) -> RawSample:
    def read(ext: str) -> bytes:
        return tar.extractfile(members[ext]).read()  # type: ignore[union-attr]  # member.isfile()

    image_ext = first_image_ext(members)
    image = read(image_ext) if image_ext is not None else None
    caption, meta = caption_and_meta(shard, key, members, read)
    return RawSample(key=key, image=image, image_ext=image_ext, caption=caption, meta=meta)


COMPRESSED_MAGIC: dict[bytes, str] = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz"}


def compression_of(head: bytes) -> str | None:
    """'gzip'/'bzip2'/'xz' if a file starting with `head` is compressed, else None."""
    return next((name for magic, name in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def check_not_truncated(shard: str | Path, file_size: int, end_offset: int, members: int) -> None:
    """ValueError if an uncompressed tar has no end-of-archive block after `end_offset`.

    tarfile silently treats a cut inside/at a header (after the first member) as the end
    of the archive, so a partially copied shard would lose samples unnoticed. A complete
    tar has end-of-archive zero block(s) after the last member.
    """
    if file_size - end_offset < tarfile.BLOCKSIZE:
        raise ValueError(f"tar shard {shard} is truncated: no end-of-archive marker after "
                         f"{members} members")


def _read_shard(path: Path, shown: str) -> Iterator[RawSample]:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot read tar shard {shown}: {exc}") from exc
    with tar:
        try:
            groups, repeats = _group_members(tar)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"cannot read tar shard {shown}: {exc}") from exc
        with path.open("rb") as f:
            compressed = compression_of(f.read(6)) is not None
        if not compressed:  # a decompressor reports truncation itself
            check_not_truncated(shown, path.stat().st_size, tar.offset, len(tar.getmembers()))
        for key, members in groups.items():
            error = repeats.error(shown, key)
            if error is not None:  # nothing of it is read: no member can be trusted
                yield RawSample(key=key, image=None, image_ext=None, caption=None, error=error)
                continue
            try:
                sample = _sample_from_group(tar, shown, key, members)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise ValueError(f"cannot read member {key!r} of tar shard {shown}: {exc}") from exc
            yield sample


def iter_webdataset(paths: Sequence[str | Path]) -> Iterator[RawSample]:
    """Yield the samples of each tar shard (local path or URI) in order.

    Reads compressed tars too (the sample index does not: it needs byte offsets).
    ValueError names an unreadable shard.
    """
    for path in paths:
        if storage.is_remote(path):
            if not storage.is_file(path):
                raise FileNotFoundError(f"WebDataset shard not found: {path}")
            with storage.local_copy(path) as local:
                yield from _read_shard(local, str(path))
            continue
        path = Path(storage.normalize(path)) if storage.scheme_of(path) else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"WebDataset shard not found: {path}")
        yield from _read_shard(path, str(path))


def safe_key(key: str) -> str:
    """Make `key` usable as a tar member stem: no dots in the basename, no absolute/.. parts."""
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"sample key {key!r} is empty after sanitising")
    # The reader ends the key at the first dot, so dots would truncate it (e.g. `img/a.png`).
    parts[-1] = parts[-1].replace(".", "_")
    return "/".join(parts)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so identical input produces byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _member_payload(sample: RawSample) -> list[tuple[str, bytes]]:
    members: list[tuple[str, bytes]] = []
    if sample.image is not None:
        ext = (sample.image_ext or "").lower().lstrip(".")
        if not ext:
            raise ValueError(f"sample {sample.key!r} has image bytes but no image_ext")
        members.append((ext, sample.image))
    record = {**sample.meta, "caption": sample.caption}
    members.append(("json", json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")))
    return members


def write_webdataset(samples: Iterable[RawSample], out_dir: str | Path, *,
                     shard_size: int = 1000, prefix: str = "shard") -> list[Path]:
    """Write `{prefix}-00000.tar`, ... (`shard_size` samples each) and return their paths.

    Keys are sanitised with `safe_key` (dots in the basename become `_`); a key that
    repeats within one shard raises ValueError. Each shard appears atomically, and
    older `{prefix}-NNNNN.tar` files beyond the new count are deleted.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    it = iter(samples)
    pending = next(it, None)
    while pending is not None:
        path = out_dir / f"{prefix}-{len(written):05d}.tar"
        seen: set[str] = set()
        with atomic_open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            while pending is not None and len(seen) < shard_size:
                key = safe_key(pending.key)
                if key in seen:
                    raise ValueError(f"duplicate sample key {key!r} (from {pending.key!r}) in shard {path}")
                seen.add(key)
                for ext, data in _member_payload(pending):
                    _add_member(tar, f"{key}.{ext}", data)
                pending = next(it, None)
        written.append(path)
        logger.debug("wrote %s (%d samples)", path, len(seen))
    _remove_stale_shards(out_dir, prefix, len(written))
    return written


def _remove_stale_shards(out_dir: Path, prefix: str, count: int) -> None:
    # A rerun that writes fewer shards must not leave old higher-numbered shards
    # behind, or the directory would silently mix two datasets.
    for path in out_dir.glob(f"{prefix}-*.tar"):
        index = path.name[len(prefix) + 1:-len(".tar")]
        if len(index) == 5 and index.isdigit() and int(index) >= count:
            logger.info("removing stale shard %s", path)
            path.unlink()


__all__ = ["TEXT_EXTS", "RepeatedMembers", "caption_and_meta", "check_not_truncated",
           "compression_of", "first_image_ext",
           "iter_webdataset", "member_key", "safe_key", "split_member_name", "write_webdataset"]

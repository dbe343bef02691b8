"""CSV/TSV manifests: `filepath,caption[,label,...]` rows pointing at image files."""
from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from . import storage
from .fileio import atomic_write_text
from .sample import RawSample
from .webdataset import safe_key

REQUIRED_COLUMNS = ("filepath", "caption")


class ManifestRow(NamedTuple):
    """One manifest row before its image is read: `image_uri` is where the image should be."""

    line: int
    key: str  # the filepath cell as written
    image_uri: str | None  # None when the cell is empty
    image_ext: str | None
    caption: str | None  # None when the row is too short to have one
    meta: dict
    error: tuple[str, str] | None = None  # (reason, message): the row is skipped unread


def manifest_delimiter(path: str | Path) -> str:
    """Comma for `.csv`, tab for `.tsv`; anything else is a ValueError naming the file."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    if suffix == ".csv":
        return ","
    if suffix == ".tsv":
        return "\t"
    raise ValueError(f"manifest {path} must end in .csv or .tsv")


def _parse_label(value: str, path: str | Path, line: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}:{line}: label {value!r} is not an integer") from None


def _root_and_path(uri: str) -> tuple[str, str]:
    # ("s3://bucket", "/key") for an object store, ("", "/abs/path") for a local path, so that
    # both are checked with the same POSIX path arithmetic.
    if storage.is_remote(uri):
        scheme, _, rest = uri.partition("://")
        bucket, _, key = rest.partition("/")
        return f"{scheme}://{bucket}", "/" + key
    return "", uri


def _image_uri(base: str, filepath: str) -> str | None:
    """Where a row's image is (normalised), or None when that is outside the manifest's directory.

    Relative paths are relative to the manifest; a cell may also be an absolute path or a full
    URI, but in every form it must name a file under the manifest's directory: the rows are
    data (often scraped), and `../../etc/passwd.png` or `/home/x/secret.png` must not be read.
    The check is on the path as written, after collapsing `.` and `..`; a symlink inside the
    directory is followed, since whoever lays out the dataset directory put it there (a
    mounted image folder is often one).
    """
    if storage.scheme_of(filepath):
        try:
            target = storage.normalize(filepath)
        except ValueError:
            return None  # e.g. http://: a URI we cannot read is not under the directory either
    elif os.path.isabs(filepath):
        if storage.is_remote(base):
            return None  # a local path is never inside a bucket
        target = filepath
    else:
        target = storage.join(base, filepath)
    base_root, base_path = _root_and_path(base)
    root, path = _root_and_path(target)
    path = posixpath.normpath(path)
    if root != base_root or posixpath.commonpath([base_path, path]) != base_path:
        return None
    return root + path


def iter_manifest_rows(path: str | Path) -> Iterator[ManifestRow]:
    """Parse a manifest (local path or URI) row by row, streaming; images are not read."""
    delimiter = manifest_delimiter(path)
    shown = path if storage.scheme_of(path) else Path(path)
    if not storage.is_file(path):
        raise FileNotFoundError(f"manifest not found: {shown}")
    base = storage.parent(path)
    with storage.open_input(path) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        try:
            yield from _rows(csv.DictReader(text, delimiter=delimiter), base, shown)
        except UnicodeDecodeError as exc:
            raise ValueError(f"manifest {shown} is not valid UTF-8: {exc}") from exc


def _rows(reader: csv.DictReader, base: str, path: str | Path) -> Iterator[ManifestRow]:
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"manifest {path} needs columns {list(REQUIRED_COLUMNS)}; "
                         f"header has {list(columns)} (missing {missing})")
    for row in reader:
        line = reader.line_num
        filepath = row.get("filepath") or ""
        # DictReader gives None for cells absent from a short row: a missing caption.
        caption = row.get("caption")
        meta: dict = {}
        for name, value in row.items():
            if name in REQUIRED_COLUMNS or name is None or value is None:
                continue  # name None = surplus cells of an over-long row
            if name == "label":
                if value.strip():
                    meta["label"] = _parse_label(value.strip(), path, line)
            else:
                meta[name] = value
        image_uri = _image_uri(base, filepath) if filepath else None
        ext = (PurePosixPath(filepath).suffix.lower().lstrip(".") or None) if filepath else None
        error = None
        if filepath and image_uri is None:
            # Skipped and counted like a row whose image is missing, not a refused manifest:
            # one bad row of millions should not stop a run, and nothing outside is read.
            error = ("outside_manifest_dir", f"{path}:{line}: image path {filepath!r} is outside "
                     f"the manifest's directory {base}; not read")
        yield ManifestRow(line, filepath, image_uri, ext, caption, meta, error)


def iter_manifest(path: str | Path) -> Iterator[RawSample]:
    """Yield one RawSample per row; a missing image file gives image=None (counted later), a
    path outside the manifest's directory an `error` (counted later, nothing read)."""
    for row in iter_manifest_rows(path):
        image = storage.read_bytes_if_file(row.image_uri) if row.image_uri else None
        yield RawSample(key=row.key, image=image, image_ext=row.image_ext, caption=row.caption,
                        meta=row.meta, error=row.error)


def write_manifest(samples: Iterable[RawSample], out_path: str | Path, *,
                   image_dir: str | Path | None = None) -> Path:
    """Write each image under `image_dir` and a manifest with paths relative to it.

    Only `label` of the meta is kept; a caption of None is written as an empty cell.
    A sample without image bytes raises ValueError (a row needs an image file).
    """
    out_path = Path(out_path)
    delimiter = manifest_delimiter(out_path)
    image_dir = Path(image_dir) if image_dir is not None else out_path.with_name(f"{out_path.stem}_images")
    image_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, object]] = []
    used: set[str] = set()
    for sample in samples:
        if sample.image is None:
            raise ValueError(f"sample {sample.key!r} has no image; a manifest row needs an image file")
        ext = (sample.image_ext or "").lower().lstrip(".")
        if not ext:
            raise ValueError(f"sample {sample.key!r} has image bytes but no image_ext")
        # Flatten the key into one file name; suffix a counter if two keys collide.
        stem = safe_key(sample.key).replace("/", "_")
        name, n = f"{stem}.{ext}", 1
        while name in used:
            name, n = f"{stem}-{n}.{ext}", n + 1
        used.add(name)
        (image_dir / name).write_bytes(sample.image)
        rel = Path(_relpath(image_dir / name, out_path.parent)).as_posix()
        rows.append((rel, sample.caption or "", sample.meta.get("label")))
    with_label = any(label is not None for _, _, label in rows)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    writer.writerow(["filepath", "caption", "label"] if with_label else ["filepath", "caption"])
    for rel, caption, label in rows:
        writer.writerow([rel, caption, "" if label is None else label] if with_label else [rel, caption])
    return atomic_write_text(out_path, buf.getvalue())


def _relpath(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())

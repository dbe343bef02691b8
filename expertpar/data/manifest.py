"""CSV/TSV manifests: `filepath,caption[,label,...]` rows pointing at image files."""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from expertpar.data.fileio import atomic_write_text
from expertpar.data.sample import RawSample
from expertpar.data.webdataset import safe_key

REQUIRED_COLUMNS = ("filepath", "caption")


def manifest_delimiter(path: Path) -> str:
    """Comma for `.csv`, tab for `.tsv`; anything else is a ValueError naming the file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return ","
    if suffix == ".tsv":
        return "\t"
    raise ValueError(f"manifest {path} must end in .csv or .tsv")


def _parse_label(value: str, path: Path, line: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}:{line}: label {value!r} is not an integer") from None


def iter_manifest(path: str | Path) -> Iterator[RawSample]:
    """Yield one RawSample per row; a missing image file gives image=None (counted later)."""
    path = Path(path)
    delimiter = manifest_delimiter(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base = path.parent
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
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
            image: bytes | None = None
            ext: str | None = None
            if filepath:
                image_path = Path(filepath)
                if not image_path.is_absolute():
                    image_path = base / image_path
                ext = image_path.suffix.lower().lstrip(".") or None
                if image_path.is_file():
                    image = image_path.read_bytes()
            yield RawSample(key=filepath, image=image, image_ext=ext, caption=caption, meta=meta)


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

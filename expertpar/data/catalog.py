"""dataset.json: class names, prompt templates and split locations of a dataset."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import storage
from .fileio import atomic_write_text

INFO_FILE = "dataset.json"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata for zero-shot eval: classes, caption templates (`{}` = class), splits."""

    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    splits: dict[str, str] = field(default_factory=dict)  # split name -> path relative to dataset.json


def write_dataset_info(info: DatasetInfo, directory: str | Path) -> Path:
    """Write `directory/dataset.json` atomically and return its path."""
    record = {"name": info.name, "classes": list(info.classes),
              "templates": list(info.templates), "splits": dict(info.splits)}
    return atomic_write_text(Path(directory) / INFO_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def _str_list(obj: dict, name: str, path: Path) -> tuple[str, ...]:
    value = obj.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{path}: field {name!r} must be a non-empty list of non-empty strings, got {value!r}")
    return tuple(value)


def read_dataset_info(path_or_dir: str | Path) -> DatasetInfo:
    """Read and validate a dataset.json (or `dir/dataset.json`)."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"dataset info not found: {path}")
    return parse_dataset_info(path.read_bytes(), path)


def parse_dataset_info(data: bytes, path: str | Path) -> DatasetInfo:
    """Validate the bytes of a dataset.json; errors name `path` (a local path or URI)."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: field 'name' must be a non-empty string, got {name!r}")
    classes = _str_list(obj, "classes", path)
    templates = _str_list(obj, "templates", path)
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"{path}: field 'templates' entry {template!r} must contain exactly one '{{}}'")
    splits = obj.get("splits", {})
    if not isinstance(splits, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in splits.items()):
        raise ValueError(f"{path}: field 'splits' must map split names to relative paths, got {splits!r}")
    return DatasetInfo(name=name, classes=classes, templates=templates, splits=dict(splits))


def _source_dir(source: str | Path) -> Path:
    # For a glob, the directory is the part before the first wildcard component.
    text = str(source)
    if any(c in _GLOB_CHARS for c in text):
        parts = Path(text).parts
        cut = next(i for i, p in enumerate(parts) if any(c in _GLOB_CHARS for c in p))
        return Path(*parts[:cut]) if cut else Path(".")
    path = Path(text)
    return path if path.is_dir() else path.parent


def locate_dataset_info(source: str | Path) -> Path | None:
    """Path of the dataset.json in the source's directory or up to 2 parents, else None."""
    directory = _source_dir(source).resolve()
    for candidate in [directory, *directory.parents][:3]:
        if (candidate / INFO_FILE).is_file():
            return candidate / INFO_FILE
    return None


def find_dataset_info(source: str | Path) -> DatasetInfo | None:
    """DatasetInfo for a data source (see `locate_dataset_info`), or None if there is none.

    For s3:// and gs:// sources the same places are searched in the bucket.
    """
    if storage.scheme_of(source):
        if storage.is_remote(source):
            return _find_remote_info(str(source))
        source = storage.normalize(source)  # file:// URI
    path = locate_dataset_info(source)
    return None if path is None else read_dataset_info(path)


def _find_remote_info(source: str) -> DatasetInfo | None:
    directory = storage.source_dir(source)
    for _ in range(3):
        candidate = storage.join(directory, INFO_FILE)
        if storage.is_file(candidate):
            return parse_dataset_info(storage.read_bytes(candidate), candidate)
        up = storage.parent(directory)
        if up == directory:
            break  # the bucket root
        directory = up
    return None


__all__ = ["INFO_FILE", "DatasetInfo", "find_dataset_info", "locate_dataset_info",
           "parse_dataset_info", "read_dataset_info", "write_dataset_info"]

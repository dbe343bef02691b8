"""The raw (undecoded) sample record shared by every on-disk format."""
from __future__ import annotations

from dataclasses import dataclass, field

# Image member extensions recognised in shards and manifests (lowercase, no dot).
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class RawSample:
    """One image-caption pair as stored: bytes are not decoded, fields may be missing.

    `image`/`caption` are None when the source lacks them; the dataset layer turns
    that into a counted skip rather than the reader raising.
    """

    key: str
    image: bytes | None
    image_ext: str | None
    caption: str | None
    meta: dict = field(default_factory=dict)

"""The raw (undecoded) sample record shared by every on-disk format."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .errors import SampleError

logger = logging.getLogger("expertpar")

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
    # (reason, message) when the reader itself found the sample unusable (a key repeated in
    # its shard, a manifest row outside its directory): nothing of it was read, and
    # validation raises this before any other check. A tuple, not a SampleError, so that
    # samples still compare equal by value.
    error: tuple[str, str] | None = None


# A caption longer than this is not a description but junk (a page, a dump): the tokenizer
# reads only its first tokenizer.context_length tokens, and the index would keep it whole.
MAX_CAPTION_CHARS = 16_384


def checked_caption(key: str, caption: str | None, *, has_image: bool) -> str:
    """The stripped caption, or SampleError for what is checked before decoding the image.

    The order (image present, caption present, caption non-empty, then the image decodes)
    decides which reason a sample with several faults is counted under.
    """
    if not has_image:
        raise SampleError("missing_image", f"sample {key!r}: no image")
    if caption is None:
        raise SampleError("missing_caption", f"sample {key!r}: no caption")
    caption = caption.strip()
    if not caption:
        raise SampleError("empty_caption", f"sample {key!r}: caption is empty")
    if len(caption) > MAX_CAPTION_CHARS:
        raise SampleError("caption_too_long", f"sample {key!r}: caption of {len(caption)} "
                          f"characters, over {MAX_CAPTION_CHARS}")
    return caption


def label_of(key: str, meta: dict) -> int:
    """The integer `label` of a sample's metadata, -1 when absent or not an integer."""
    value = meta.get("label")
    if value is None or isinstance(value, bool):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        logger.warning("sample %r: label %r is not an integer; using -1", key, value)
        return -1

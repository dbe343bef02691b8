"""Small shard builders shared by the index, storage and S3 tests."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def png(colour: tuple[int, int, int], size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_messy_shard(path: Path) -> Path:
    """6 good samples (one needs a PAX header for its long name); skips: 2 corrupt_image and one
    each of empty_caption, missing_caption, missing_image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    long_key = "deep/" + "x" * 120  # > 100 chars: a PAX header precedes the member
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(3):
            add_member(tar, f"good{i}.png", png((60 * i, 0, 0)))
            add_member(tar, f"good{i}.json", json.dumps({"caption": f"red number {i}", "label": i}).encode())
        add_member(tar, "corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg")
        add_member(tar, "corrupt.txt", b"a caption")
        add_member(tar, "empty.png", png((1, 2, 3)))
        add_member(tar, "empty.txt", b"   \n")
        add_member(tar, "nocap.png", png((1, 2, 3)))
        add_member(tar, "nocap.json", json.dumps({"label": 3}).encode())
        add_member(tar, "noimage.txt", b"a caption without an image")
        add_member(tar, "noimage.npy", b"not an image")
        add_member(tar, f"{long_key}.txt", b"a long-named sample")  # caption before its image
        add_member(tar, f"{long_key}.png", png((0, 200, 0)))
        add_member(tar, "two.webp", b"not a webp")  # the first image member is the image...
        add_member(tar, "two.png", png((200, 9, 9)))
        add_member(tar, "two.txt", b"two images, the first one counts")
        add_member(tar, "three.jpg", png((9, 9, 9)))  # ...so a bad second one does not matter
        add_member(tar, "three.webp", b"not a webp")
        add_member(tar, "three.txt", b"a grey square")
        add_member(tar, "good9.png", png((0, 0, 200)))
        add_member(tar, "good9.txt", b"a blue square without label")
    return path


def write_repeated_keys_shard(path: Path) -> Path:
    """3 good samples (b, and d and e whose members interleave: not repeats) and 2 repeated keys,
    each one duplicate_key skip: `a` again after another key, and `c` with its image twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        add_member(tar, "a.png", png((200, 0, 0)))
        add_member(tar, "a.txt", b"a red square")
        add_member(tar, "b.png", png((0, 200, 0)))
        add_member(tar, "b.txt", b"a green square")
        add_member(tar, "a.png", png((0, 0, 200)))  # another sample under the same key
        add_member(tar, "a.txt", b"a blue square")
        add_member(tar, "c.png", png((9, 9, 9)))
        add_member(tar, "c.txt", b"a dark square")
        add_member(tar, "c.png", png((250, 250, 250)))  # which one is the dark square?
        add_member(tar, "d.png", png((0, 90, 90)))
        add_member(tar, "e.png", png((90, 0, 90)))
        add_member(tar, "d.txt", b"a teal square")
        add_member(tar, "e.txt", b"a purple square")
    return path


def write_manifest_dir(root: Path) -> Path:
    """A CSV manifest with relative image paths, one missing image and one empty caption."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (root / "img" / f"{i}.png").write_bytes(png((i * 50, 100, 100), size=16 + i))
    manifest = root / "list.csv"
    manifest.write_text("filepath,caption,label\n"
                        "img/0.png,a teal square,0\n"
                        "img/1.png,\"a square, lighter\",1\n"
                        "img/gone.png,lost,2\n"
                        "img/2.png,  ,3\n"
                        "img/3.png,a pink square,\n")
    return manifest


class CountingMap:
    """A map_fn that records the files it is asked to scan (to see a cache hit)."""

    def __init__(self) -> None:
        self.files: list[str] = []

    def __call__(self, func, uris):
        self.files += list(uris)
        return map(func, uris)

"""A generated GloVe-format file for the synthetic shapes, with held-out synonyms.

Every word of the synthetic captions gets a random vector; each synonym below (never in a
caption) gets its original's vector plus a little noise, as a real GloVe file puts "crimson"
near "red". Some unrelated words fill the file as a real one would.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from expertpar.data.synthetic import COLORS, RELATIONS, SHAPES, SIZES

SYNONYMS = {"red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden",
            "circle": "ring", "square": "box", "triangle": "wedge", "cross": "plus"}
CAPTION_WORDS = ["a", *SIZES, *COLORS, *SHAPES,
                 *dict.fromkeys(w for r in RELATIONS for w in r.split())]
OTHER_WORDS = ["the", "dog", "house", "river", "music", "paper", "window", "story", "cloud",
               "engine", "garden", "silver", "table", "bridge", "forest", "letter"]


def shapes_glove_vectors(dim: int = 50, noise: float = 0.3, seed: int = 0
                         ) -> dict[str, np.ndarray]:
    """word -> vector, in the file's order: caption words, synonyms, other words."""
    rng = np.random.default_rng(seed)
    vectors = {w: rng.standard_normal(dim).astype(np.float32) for w in CAPTION_WORDS}
    for word, synonym in SYNONYMS.items():
        vectors[synonym] = vectors[word] + noise * rng.standard_normal(dim).astype(np.float32)
    for word in OTHER_WORDS:
        vectors[word] = rng.standard_normal(dim).astype(np.float32)
    return vectors


def write_glove(path: Path, vectors: dict[str, np.ndarray]) -> Path:
    text = "".join(f"{w} {' '.join(f'{x:.6f}' for x in v)}\n" for w, v in vectors.items())
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def synonym_classes(classes, replace=("colour", "shape")) -> tuple[str, ...]:
    """The class names with their colour and/or shape word swapped for its synonym."""
    out = []
    for name in classes:
        colour, shape = name.split(" ")
        if "colour" in replace:
            colour = SYNONYMS[colour]
        if "shape" in replace:
            shape = SYNONYMS[shape]
        out.append(f"{colour} {shape}")
    return tuple(out)

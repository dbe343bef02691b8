"""Reading GloVe word vectors: the text file format `word v1 ... vd`, one word a line.

The files (Pennington et al. 2014; nlp.stanford.edu/projects/glove) are sorted by corpus
frequency and may be gzipped; a word2vec-style first line `N d` is skipped. Real files run to
gigabytes, so they are streamed, and only the vectors asked for are kept.

Which token a GloVe word stands for is the tokenizer's business (``token_form``: "Red" ->
"red"; "can't" is three pieces, never one token). The first line with a form wins: GloVe is
frequency-sorted, so for a cased file that is the word's commonest spelling.
"""
from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenizer import token_form

GZIP_MAGIC = b"\x1f\x8b"


class GloveError(ValueError):
    """A GloVe file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class GloveVectors:
    vectors: dict[str, np.ndarray]  # token form -> float32 (d,), only the forms asked for
    words_read: int  # vector lines in the file
    dim: int  # d


def _open_binary(path: Path) -> io.BufferedIOBase:
    # Gzip by suffix or by its magic bytes (a downloaded file renamed without .gz still reads).
    try:
        with open(path, "rb") as f:
            gzipped = path.suffix == ".gz" or f.read(2) == GZIP_MAGIC
    except OSError as err:
        raise GloveError(f"GloVe file {path}: cannot be read ({err.strerror or err})") from None
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _lines(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, word, its d numbers as text) for every vector line; blank lines and a
    word2vec header are skipped; a line with another count of fields than the first raises.
    The numbers stay text: parsing 300 floats a line is most of a big file's reading time, and
    only the lines of the vocabulary's words need it (``_vector``)."""
    dim = None
    lineno = 0
    with _open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                # Decoded line by line (not by a text wrapper's 8 KB chunks), so an error
                # names its line.
                line = raw.decode("utf-8").rstrip()
                if not line:
                    continue
                fields = line.count(" ")  # GloVe separates by one space
                if dim is None:
                    if lineno == 1 and fields == 1 and line.replace(" ", "").isdigit():
                        continue  # word2vec's "N d" header
                    dim = fields
                    if dim < 1:
                        raise GloveError(f"GloVe file {path} line {lineno}: a word without a "
                                         f"vector ({line[:40]!r})")
                if fields == dim:
                    cut = line.index(" ")
                    yield lineno, line[:cut], line[cut + 1:]
                    continue
                if fields < dim:
                    raise GloveError(f"GloVe file {path} line {lineno}: {fields} numbers after "
                                     f"the word, expected {dim} (as on the first line)")
                # More fields: a word with spaces in it (glove.840B has a few, some with a
                # number in them: "Sept 11"). Kept whole, so it can never be one token; not an
                # error, or one such line would stop the run.
                parts = line.split(" ")
                yield lineno, " ".join(parts[:-dim]), " ".join(parts[-dim:])
        except UnicodeDecodeError as err:
            raise GloveError(f"GloVe file {path} line {lineno}: not UTF-8 ({err.reason})"
                             ) from None
        except (OSError, EOFError) as err:  # a truncated or corrupt gzip stream
            raise GloveError(f"GloVe file {path} after line {lineno}: cannot be read ({err})"
                             ) from None


def _vector(path: Path, lineno: int, numbers: str) -> np.ndarray:
    fields = numbers.split(" ")
    try:
        v = np.array(fields, dtype=np.float32)
    except ValueError:
        bad = next(x for x in fields if not _is_number(x))
        raise GloveError(f"GloVe file {path} line {lineno}: {bad[:40]!r} is not a number") from None
    if not np.isfinite(v).all():
        raise GloveError(f"GloVe file {path} line {lineno}: the vector is not finite")
    return v


def glove_words(path: str | Path) -> Iterator[str]:
    """The file's words in file order (by frequency): what a trained vocabulary takes after
    the captions' own words. Lazy: a consumer that stops after a thousand words reads a
    thousand lines, not the whole file."""
    for _, word, _ in _lines(Path(path)):
        yield word


def read_glove(path: str | Path, tokenizer, wanted: set[str]) -> GloveVectors:
    """Vectors of the token forms in ``wanted`` (the first line of each form), reading the
    whole file: every line's count of fields is checked, the numbers of the lines kept."""
    path = Path(path)
    vectors: dict[str, np.ndarray] = {}
    words_read, dim = 0, 0
    for lineno, word, numbers in _lines(path):
        words_read += 1
        dim = dim or numbers.count(" ") + 1
        form = token_form(tokenizer, word)
        if form in wanted and form not in vectors:
            vectors[form] = _vector(path, lineno, numbers)
    if words_read == 0:
        raise GloveError(f"GloVe file {path}: no word vectors in it")
    return GloveVectors(vectors=vectors, words_read=words_read, dim=dim)


__all__ = ["GloveError", "GloveVectors", "glove_words", "read_glove", "token_form"]

"""Reading GloVe files, and the trained vocabulary taking GloVe's words."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from expertpar.data.glove import GloveError, glove_words, read_glove
from expertpar.data.tokenizer import token_form, train_tokenizer

# GloVe's layout: frequency order, one word a line, d = 3 numbers after it.
GLOVE = """the 0.1 0.2 0.3
Red 1 0 0
can't 5 5 5
crimson 0.9 0.1 0
red 7 7 7
azure 0 0 1
Café -1 -2 -3.5e-1
"""


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tok():
    return train_tokenizer(["a red circle", "a blue square"], vocab_size=64)


def test_token_form_is_what_the_tokenizer_keeps_as_one_piece(tok):
    assert token_form(tok, "Red") == "red"
    assert token_form(tok, "Café") == "cafe"  # lowercased, accent stripped
    assert token_form(tok, "can't") is None  # three pieces: can ' t
    assert token_form(tok, "##r") is None and token_form(tok, "[UNK]") is None
    assert token_form(tok, "") is None


@pytest.mark.parametrize("name", ["glove.txt", "glove.txt.gz", "renamed_gzip.txt"])
def test_reads_plain_and_gzipped_files(tmp_path, tok, name):
    path = tmp_path / name
    if name == "renamed_gzip.txt":  # gzipped, without the suffix: found by the magic bytes
        path.write_bytes(gzip.compress(GLOVE.encode()))
    else:
        _write(path, GLOVE)
    got = read_glove(path, tok, {"red", "crimson", "cafe", "circle", "can't"})
    assert (got.words_read, got.dim) == (7, 3)
    # "Red" (line 2) is the first line of the form "red": line 5's vector is not taken;
    # "can't" is never one token; "circle" is not in the file.
    assert sorted(got.vectors) == ["cafe", "crimson", "red"]
    np.testing.assert_array_equal(got.vectors["red"], [1, 0, 0])
    np.testing.assert_array_equal(got.vectors["cafe"], np.float32([-1, -2, -0.35]))
    assert got.vectors["red"].dtype == np.float32


def test_a_word2vec_header_is_skipped(tmp_path, tok):
    got = read_glove(_write(tmp_path / "g.txt", "7 3\n" + GLOVE), tok, {"the"})
    assert (got.words_read, got.dim) == (7, 3)
    np.testing.assert_allclose(got.vectors["the"], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("text,line,says", [
    ("a 1 2 3\nb 1 2\n", 2, "2 numbers after the word, expected 3"),
    ("a 1 2 3\n\nred 1 x 3\n", 3, "'x' is not a number"),  # a line whose vector is used
    ("a 1 2 3\nred 1 nan 3\n", 2, "not finite"),
    ("lonely\n", 1, "a word without a vector"),
])
def test_a_malformed_line_is_named_with_the_file_and_its_number(tmp_path, tok, text, line, says):
    path = _write(tmp_path / "bad.txt", text)
    with pytest.raises(GloveError, match=f"GloVe file {path} line {line}: .*{says}"):
        read_glove(path, tok, {"red"})
    gz = _write(tmp_path / "bad.txt.gz", text)  # the same line, counted in the gzipped file
    with pytest.raises(GloveError, match=f"{gz} line {line}: "):
        read_glove(gz, tok, {"red"})


def test_unreadable_empty_and_non_utf8_files(tmp_path, tok):
    with pytest.raises(GloveError, match="nowhere.txt: cannot be read"):
        read_glove(tmp_path / "nowhere.txt", tok, set())
    with pytest.raises(GloveError, match="empty.txt: no word vectors"):
        read_glove(_write(tmp_path / "empty.txt", "\n"), tok, set())
    (tmp_path / "latin1.txt").write_bytes("a 1 2\ncaf\xe9 1 2\n".encode("latin-1"))
    with pytest.raises(GloveError, match="latin1.txt line 2: not UTF-8"):
        read_glove(tmp_path / "latin1.txt", tok, set())
    (tmp_path / "torn.txt.gz").write_bytes(gzip.compress(GLOVE.encode())[:-12])
    with pytest.raises(GloveError, match="torn.txt.gz after line \\d+: cannot be read"):
        read_glove(tmp_path / "torn.txt.gz", tok, set())


def test_a_word_with_spaces_is_kept_whole_never_a_token(tmp_path, tok):
    # glove.840B has a few such lines; they must not shift the vector or raise.
    path = _write(tmp_path / "g.txt",
                  "a 1 2 3\nat name@domain.com 4 5 6\nsept 11 1 2 3\nred 7 8 9\n")
    got = read_glove(path, tok, {"red", "at", "sept"})
    assert sorted(got.vectors) == ["red"] and got.words_read == 4
    np.testing.assert_array_equal(got.vectors["red"], [7, 8, 9])
    assert list(glove_words(path)) == ["a", "at name@domain.com", "sept 11", "red"]


def test_the_trained_vocabulary_takes_glove_words_in_file_order(tmp_path):
    captions = ["a red circle", "a blue square"]
    base = train_tokenizer(captions, vocab_size=64)
    n = base.get_vocab_size()
    path = _write(tmp_path / "g.txt", GLOVE)
    # Room for three more: "the", then "red" (already a caption word), "can't" (not one
    # piece: skipped), "crimson", "red" again, then "azure"; "cafe" finds no room.
    tok = train_tokenizer(captions, vocab_size=n + 3, extra_words=glove_words(path))
    vocab = tok.get_vocab()
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][n:] == ["the", "crimson", "azure"]
    assert {t: vocab[t] for t in base.get_vocab()} == base.get_vocab()  # captions' ids unchanged
    assert tok.encode("a crimson circle").tokens == ["[BOS]", "a", "crimson", "circle", "[EOS]"]
    # Deterministic: the same captions and file give the same tokenizer.
    again = train_tokenizer(captions, vocab_size=n + 3, extra_words=glove_words(path))
    assert again.to_str() == tok.to_str()
    # Only as far as there is room: a broken line after it is not read here.
    broken = _write(tmp_path / "broken.txt", "the 1 2 3\ncrimson 1 2 3\nbad 1\n")
    assert train_tokenizer(captions, vocab_size=n + 1,
                           extra_words=glove_words(broken)).get_vocab_size() == n + 1

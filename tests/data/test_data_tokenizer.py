"""Tests for caption tokenisation."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from expertpar.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    encode_captions,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    vocab_size,
)

CAPTIONS = [
    "a small red circle above a large blue square",
    "a large green triangle left of a small yellow cross",
    "A photo of a T-shirt/top.",
    "Café crème, right of the ankle boot!",
] * 5


def test_special_token_ids_and_normalisation() -> None:
    tok = train_tokenizer(CAPTIONS, vocab_size=200)
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[BOS]", "[EOS]")] == [PAD_ID, UNK_ID, BOS_ID, EOS_ID]
    enc = tok.encode("CAFÉ t-shirt")
    assert enc.tokens == ["[BOS]", "cafe", "t", "-", "shirt", "[EOS]"]
    assert 4 < vocab_size(tok) <= 200
    assert tok.decode(enc.ids) == "cafe t - shirt"


def test_training_is_deterministic_and_order_independent() -> None:
    shuffled = list(CAPTIONS)
    random.Random(0).shuffle(shuffled)
    ref = train_tokenizer(CAPTIONS, vocab_size=60).to_str()
    assert train_tokenizer(CAPTIONS, vocab_size=60).to_str() == ref
    assert train_tokenizer(shuffled, vocab_size=60).to_str() == ref


def test_vocab_size_is_respected_and_unknowns_fall_back() -> None:
    tok = train_tokenizer(CAPTIONS, vocab_size=40)
    assert vocab_size(tok) == 40
    ids = tok.encode("zzz").ids  # 'z' never seen -> [UNK]
    assert ids == [BOS_ID, UNK_ID, EOS_ID]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CAPTIONS, vocab_size=4)


def test_save_load_round_trip(tmp_path: Path) -> None:
    tok = train_tokenizer(CAPTIONS, vocab_size=100)
    path = save_tokenizer(tok, tmp_path / "tok.json")
    assert load_tokenizer(path).to_str() == tok.to_str()
    save_tokenizer(tok, tmp_path)  # a directory means dir/tokenizer.json
    assert load_tokenizer(tmp_path).encode(CAPTIONS[0]).ids == tok.encode(CAPTIONS[0]).ids


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)


def test_encode_shapes_padding_and_mask() -> None:
    tok = train_tokenizer(CAPTIONS, vocab_size=200)
    ids, mask = encode_captions(tok, ["a red circle", "a"], context_length=8)
    assert ids.shape == mask.shape == (2, 8)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids[1].tolist()[:3] == [BOS_ID, tok.token_to_id("a"), EOS_ID]
    assert ids[1, 3:].eq(PAD_ID).all() and mask[1].tolist() == [True] * 3 + [False] * 5
    assert mask[0].sum() == 5 and ids[0, 4] == EOS_ID


def test_truncation_keeps_eos() -> None:
    tok = train_tokenizer(CAPTIONS, vocab_size=200)
    ids, mask = encode_captions(tok, [CAPTIONS[0]], context_length=5)
    assert mask.all()
    full = tok.encode(CAPTIONS[0]).ids
    assert ids[0].tolist() == full[:4] + [EOS_ID]
    with pytest.raises(ValueError, match="context_length"):
        encode_captions(tok, ["a"], context_length=1)

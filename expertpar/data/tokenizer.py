"""Caption tokenisation: a small WordPiece tokenizer trained on the captions."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .fileio import atomic_write_text

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)  # ids 0..3 in this order
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.json"


def _build(vocab: dict[str, int] | None = None) -> Tokenizer:
    model = (models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##") if vocab
             else models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace + each punctuation char
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
    return tok


def train_tokenizer(captions: Iterable[str], vocab_size: int = 1000,
                    extra_words: Iterable[str] = ()) -> Tokenizer:
    """Build a WordPiece vocabulary from `captions`; same captions give the same tokenizer.

    The vocab is: special tokens, then single characters (word-initial and `##`
    continuation, most frequent first), then whole words by frequency, then `extra_words`
    in their order (GloVe's, so words absent from the captions have a token to take a
    vector), as their `token_form`, skipping those that are not one piece, up to
    `vocab_size`. Unknown words thus fall back to characters. `extra_words` is read only
    as far as the vocabulary has room. We do not use `tokenizers`' WordPieceTrainer: it
    breaks frequency ties in hash-map order, so two runs on the same captions can give
    different vocabularies (and checkpoints would not match their tokenizer).
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    probe = _build()
    words: Counter[str] = Counter()
    for caption in captions:
        text = probe.normalizer.normalize_str(caption)
        words.update(piece for piece, _ in probe.pre_tokenizer.pre_tokenize_str(text))
    chars: Counter[str] = Counter()
    for word, count in words.items():
        for i, ch in enumerate(word):
            chars[ch if i == 0 else f"##{ch}"] += count
    by_freq = lambda counter: sorted(counter, key=lambda t: (-counter[t], t))  # noqa: E731
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for token in by_freq(chars) + by_freq(words):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(token, len(vocab))
    for word in extra_words:
        if len(vocab) >= vocab_size:
            break
        token = token_form(probe, word)
        if token is not None:
            vocab.setdefault(token, len(vocab))
    tok = _build(vocab)
    # Registering them as special lets decode(skip_special_tokens=True) drop them;
    # they are already in the vocab, so their ids stay 0..3.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    _check_special_ids(tok, "trained tokenizer")
    return tok


def token_form(tok: Tokenizer, word: str) -> str | None:
    """The one token `word` is to `tok` before WordPiece splits it: normalised ("Red" ->
    "red"), or None when the pre-tokenizer makes more than one piece of it ("can't")."""
    text = tok.normalizer.normalize_str(word) if tok.normalizer is not None else word
    if tok.pre_tokenizer is not None:
        pieces = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    else:
        pieces = text.split()
    return text if pieces == [text] else None


def _check_special_ids(tok: Tokenizer, where: str) -> None:
    # The model and padding code assume these fixed ids.
    for token, expected in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        got = tok.token_to_id(token)
        if got != expected:
            raise ValueError(f"{where}: special token {token} has id {got}, expected {expected}")


def _tokenizer_path(path: str | Path) -> Path:
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write tokenizer JSON atomically to `path` (or `path/tokenizer.json` for a directory)."""
    target = _tokenizer_path(path)
    return atomic_write_text(target, tok.to_str(pretty=True))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file (or `dir/tokenizer.json`), checking the special-token ids."""
    target = _tokenizer_path(path)
    if not target.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {target}")
    try:
        tok = Tokenizer.from_file(str(target))
    except Exception as exc:  # noqa: BLE001 - the Rust binding raises plain Exception
        raise ValueError(f"cannot load tokenizer from {target}: {exc}") from exc
    _check_special_ids(tok, str(target))
    return tok


def vocab_size(tok: Tokenizer) -> int:
    """Number of token ids, special tokens included (the embedding table size)."""
    return tok.get_vocab_size(with_added_tokens=True)


def encode_captions(tok: Tokenizer, captions: Sequence[str],
                    context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise to `ids_BL` (int64, 0-padded) and `mask_BL` (True on real tokens).

    Over-long captions are cut to `context_length` with [EOS] kept as the last token,
    since text pooling may read the [EOS] position.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 to hold [BOS] and [EOS], got {context_length}")
    captions = list(captions)
    ids_BL = torch.full((len(captions), context_length), PAD_ID, dtype=torch.int64)
    mask_BL = torch.zeros((len(captions), context_length), dtype=torch.bool)
    for row, enc in enumerate(tok.encode_batch(captions, add_special_tokens=True)):
        ids = enc.ids
        if len(ids) > context_length:
            ids = ids[: context_length - 1] + [EOS_ID]
        ids_BL[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        mask_BL[row, : len(ids)] = True
    return ids_BL, mask_BL


__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_TOKENS", "UNK_ID", "encode_captions",
    "load_tokenizer", "save_tokenizer", "token_form", "train_tokenizer", "vocab_size",
]

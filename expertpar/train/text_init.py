"""Token embeddings from GloVe word vectors (``tokenizer.glove``), worked out on the driver.

A whole-word token (not a ``##`` piece, not a special token) whose word is in the GloVe file
starts from that word's vector; every other row keeps the ordinary N(0, 0.02^2) init. Why it
helps: a word the captions never use keeps its start row through training (no gradient reaches
it, and embeddings have no weight decay, train/optim.py), so at evaluation it means what GloVe
says, close to its synonyms that training did shape; without GloVe it is [UNK] or a string of
character pieces.

Shapes: N covered tokens, d GloVe's dimension, D model.dim.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ..data.glove import read_glove
from ..data.tokenizer import SPECIAL_TOKENS, vocab_size
from ..model.stems import TOKEN_INIT_STD
from .spec import TextInit

log = logging.getLogger("expertpar")


def projection(d: int, dim: int, seed: int) -> torch.Tensor:
    """A fixed Gaussian map ``P_dD`` from GloVe's d dimensions to model.dim (Johnson-
    Lindenstrauss: angles between vectors survive, nearly). Its own generator: the global RNG,
    which seeds the dense initialisation, is left where it was."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d, dim, generator=gen, dtype=torch.float32) / math.sqrt(dim)


def whole_word_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """Token -> id for the tokens that can stand for a whole word."""
    special = set(SPECIAL_TOKENS) | {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    return {token: i for token, i in tokenizer.get_vocab(with_added_tokens=True).items()
            if not token.startswith("##") and token not in special}


def glove_text_init(tokenizer: Tokenizer, path: str | Path, dim: int, seed: int) -> TextInit:
    """The embedding rows of ``tokenizer``'s whole-word tokens found in the GloVe file at
    ``path``, projected to ``dim`` (seeded by ``seed``) if GloVe's dimension differs."""
    t0 = time.perf_counter()
    tokens = whole_word_tokens(tokenizer)
    glove = read_glove(path, tokenizer, set(tokens))
    covered = sorted((tokens[t], t) for t in glove.vectors)
    ids = tuple(i for i, _ in covered)
    if covered:
        rows_Nd = torch.from_numpy(np.stack([glove.vectors[t] for _, t in covered]))
    else:
        rows_Nd = torch.zeros(0, glove.dim)
    rows_ND = rows_Nd if glove.dim == dim else rows_Nd @ projection(glove.dim, dim, seed)
    # One scale for all covered rows, so their RMS is the table's init std: raw GloVe entries
    # are ~10x to 50x larger (norms ~5), and rows that large would drown the position
    # embeddings (word order: "left of") and the uncovered rows at the block's input, and
    # start the text tower far from the scale its initialisation and learning rate are made
    # for. A single factor keeps GloVe's geometry: angles and relative norms.
    rms = float(rows_ND.pow(2).mean().sqrt()) if len(ids) else 0.0
    if rms > 0:
        rows_ND = rows_ND * (TOKEN_INIT_STD / rms)
    init = TextInit(ids=ids, rows_ND=rows_ND.numpy().astype(np.float32), words_read=glove.words_read,
                    glove_dim=glove.dim, vocab=vocab_size(tokenizer))
    log.info("tokenizer.glove %s: %d of %d vocabulary tokens covered (%d words read, %d dims%s)"
             " in %.1fs", path, len(ids), init.vocab, glove.words_read, glove.dim,
             f", projected to {dim}" if glove.dim != dim else "", time.perf_counter() - t0)
    return init


@torch.no_grad()
def apply_text_init(model: torch.nn.Module, init: TextInit) -> None:
    """Overwrite the covered rows of ``model``'s token-embedding table; the rest stay."""
    weight_VD = model.text_embed.tok.weight
    if init.rows_ND.shape[1:] != weight_VD.shape[1:] or init.vocab != weight_VD.shape[0]:
        raise ValueError(f"tokenizer.glove: the rows worked out for a vocabulary of "
                         f"{init.vocab} x dim {init.rows_ND.shape[1]} do not fit the model's "
                         f"token embeddings {tuple(weight_VD.shape)}")
    if init.ids:
        ids = torch.tensor(init.ids, dtype=torch.int64, device=weight_VD.device)
        weight_VD[ids] = torch.from_numpy(init.rows_ND).to(weight_VD)

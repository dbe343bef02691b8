"""What the driver decides before the first step, and hands every worker.

Its own module, light on imports (no torch, model or data pipeline): Ray Train's controller
unpickles it with the workers' payload, and every import there delays each start and recovery
of a Ray job.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..data.catalog import DatasetInfo


@dataclass(frozen=True)
class TextInit:
    """Token-embedding rows a fresh run starts from (GloVe's, train/text_init.py): worked out
    once on the driver, since reading a GloVe file takes seconds to minutes, and applied by
    every process that builds the model, so all start identically."""
    ids: tuple[int, ...]  # the token ids covered, ascending
    rows_ND: np.ndarray  # float32 (len(ids), model.dim): their embedding rows
    words_read: int  # vector lines in the GloVe file
    glove_dim: int  # d, before any projection to model.dim
    vocab: int  # V, the tokenizer's size

    def metrics(self) -> dict[str, int]:
        return {"tokenizer/glove_covered": len(self.ids), "tokenizer/vocab": self.vocab}


@dataclass(frozen=True)
class RunSpec:
    """Everything decided before the first step (on the driver): it travels to every worker."""
    cfg: Config
    run_dir: str
    start: int  # first step to run (the resumed checkpoint's step, or 0)
    end: int  # one past the last step this call runs
    tokenizer_json: str
    train_location: str  # the training split's sample index (see data/index.py)
    train_samples: int
    skipped: dict[str, int]  # bad training samples by reason, data/skipped/...
    eval_location: str | None  # the held-out split's sample index
    info: DatasetInfo | None  # class names and prompt templates for zero-shot evaluation
    resume_from: str | None  # the checkpoint every owner restores from
    # tokenizer.glove's rows, on a fresh start only (a resumed run loads its embeddings)
    text_init: TextInit | None = None

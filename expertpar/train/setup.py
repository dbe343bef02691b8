"""Everything a run needs before its first step: device, data, tokenizer, model."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data import (DatasetInfo, ImageTextDataset, find_dataset_info, load_tokenizer,
                    save_tokenizer, train_tokenizer, vocab_size)
from ..model import VisionLanguageModel
from ..moe import MoEBackend

log = logging.getLogger("expertpar")


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """``--no-resume`` into a used run directory: move what the earlier run wrote into
    ``replaced-<time>/`` (nothing is deleted), so the new run starts clean."""
    names = ("checkpoints", "metrics.jsonl", "tokenizer.json", "eval.json", "ray_topology.json")
    found = [run_dir / n for n in names if (run_dir / n).exists()]
    if not found:
        return None
    aside = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
    aside.mkdir()
    for path in found:
        path.rename(aside / path.name)
    log.warning("--no-resume: moved the earlier run's files to %s", aside)
    return aside


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'train.device': 'cuda' but no CUDA device is available")
    return torch.device(name)


@dataclass
class RunData:
    train: ImageTextDataset
    eval: ImageTextDataset | None
    info: DatasetInfo | None
    tokenizer: object


def load_run_data(cfg: Config, run_dir: Path) -> RunData:
    """Read both splits (skipping bad samples), and train or load the tokenizer."""
    train = ImageTextDataset.load(cfg.data.train, max_samples=cfg.data.max_train_samples)
    if len(train) < cfg.train.batch_size:
        raise ValueError(f"data.train '{cfg.data.train}' has {len(train)} usable samples, fewer "
                         f"than train.batch_size ({cfg.train.batch_size})")
    evald = (ImageTextDataset.load(cfg.data.eval, max_samples=cfg.data.max_eval_samples)
             if cfg.data.eval else None)
    info = (find_dataset_info(cfg.data.eval) if cfg.data.eval else None) or find_dataset_info(
        cfg.data.train)
    return RunData(train, evald, info, load_tokenizer_for(cfg, run_dir, train.captions))


def load_tokenizer_for(cfg: Config, run_dir: Path, captions: list[str]):
    """The run's tokenizer: kept from an earlier start, loaded from a file, or trained."""
    saved = run_dir / "tokenizer.json"
    if saved.exists():  # a resumed run keeps the vocabulary its weights were trained with
        return load_tokenizer(saved)
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:
        tokenizer = train_tokenizer(captions, cfg.tokenizer.vocab_size)
    save_tokenizer(tokenizer, saved)
    return tokenizer


def build_model(cfg: Config, vocab: int, backend: MoEBackend | None = None) -> VisionLanguageModel:
    torch.manual_seed(cfg.run.seed)  # the dense initialisation depends on the seed alone
    return VisionLanguageModel(cfg.model, image_size=cfg.data.image_size, vocab_size=vocab,
                               context_length=cfg.tokenizer.context_length, backend=backend,
                               seed=cfg.run.seed)


def model_for_tokenizer(cfg: Config, tokenizer, backend: MoEBackend | None = None):
    return build_model(cfg, vocab_size(tokenizer), backend)

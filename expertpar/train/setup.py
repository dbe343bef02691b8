"""Everything a run decides before its first step, on the driver: run directory, data index,
tokenizer, the checkpoint to resume from. The result is a ``RunSpec`` every worker receives."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from ..config import Config, ConfigError, config_to_dict, dump_config, get_path
from ..data import (SampleIndex, load_tokenizer, save_tokenizer, train_tokenizer,
                    vocab_size)
from ..data.glove import glove_words
from ..model import VisionLanguageModel
from ..moe import MoEBackend
from .checkpoint import CheckpointError, latest_checkpoint, read_train_state
from .spec import RunSpec
from .text_init import apply_text_init, glove_text_init

log = logging.getLogger("expertpar")
IndexBuilder = Callable[..., SampleIndex]  # SampleIndex.build, or its Ray-parallel twin


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """``--no-resume`` into a used run directory: move what the earlier run wrote into
    ``replaced-<time>/`` (nothing is deleted), so the new run starts clean."""
    names = ("checkpoints", "metrics.jsonl", "tokenizer.json", "eval.json", "ray_topology.json",
             "recoveries.json", "upcycled_from.json", "report")
    found = [run_dir / n for n in names if (run_dir / n).exists()]
    # TensorBoard's event files too: left in place, its readers would show both runs as one.
    found += sorted(run_dir.glob("events.out.tfevents.*"))
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


def open_run(cfg: Config, *, resume: bool) -> Path | None:
    """Make the run directory (setting an earlier run aside without ``resume``) and find the
    checkpoint to resume from: the first decision of a run, cheap, so the Ray driver can start
    the expert actors from it while the data is indexed."""
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        set_aside_previous_run(run_dir)
        return None
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is not None:
        check_resumable(cfg, ckpt)
    return ckpt


# The config keys that give the parameters their shapes or their meaning: a checkpoint written
# with other values cannot be resumed (the rest, e.g. capacity, losses' weights, the learning
# rate, may change between a run and its resumption).
SHAPING_KEYS = ("model.variant", "model.towers", "model.stem", "model.patch_size", "model.dim",
                "model.depth", "model.heads", "model.ffn_hidden", "model.embed_dim",
                "model.moe.num_experts", "model.moe.every", "model.moe.expert_hidden",
                "model.moe.activation", "model.objective", "model.decoder_depth",
                "tokenizer.context_length", "data.image_size")


def check_resumable(cfg: Config, ckpt: Path) -> None:
    """Refuse, before anything loads it, a checkpoint whose model config differs from
    ``cfg``'s in a key of SHAPING_KEYS (and a dense model's in model.moe.top_k), listing every
    difference."""
    if not (ckpt / "config.yaml").exists():  # a checkpoint written without its config
        return
    saved = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    now = config_to_dict(cfg)
    differences = []
    # A dense model's FFNs where MoE layers would be are top_k x expert_hidden wide: there
    # top_k shapes parameters too (in a MoE model it only routes).
    dense = cfg.model.variant == "dense" and get_path(saved, "model.variant") == "dense"
    for key in SHAPING_KEYS + (("model.moe.top_k",) if dense else ()):
        there, here = get_path(saved, key), get_path(now, key)
        if there is not None and there != here:
            differences.append(f"{key} {there!r} there, {here!r} now")
    if differences:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by a model this config does not describe: "
            + "; ".join(differences) + ". Resume with the checkpoint's values, or start over "
            "with --no-resume (the earlier run is set aside, not deleted).")


def prepare_run(cfg: Config, ckpt: Path | None, *, stop_after: int | None,
                build_index: IndexBuilder = SampleIndex.build
                ) -> tuple[RunSpec, SampleIndex, SampleIndex | None]:
    """Index both splits (skipping bad samples), train or load the tokenizer, and say which
    steps to run; returns the spec every worker receives and both splits' indexes."""
    run_dir = cfg.run_dir.resolve()
    glove = glove_path(cfg) if ckpt is None else None  # a resumed run has its embeddings
    seed_everything(cfg.run.seed)
    train = build_index(cfg.data.train, max_samples=cfg.data.max_train_samples)
    if len(train) < cfg.train.batch_size:
        raise ValueError(f"data.train '{cfg.data.train}' has {len(train)} usable samples, fewer "
                         f"than train.batch_size ({cfg.train.batch_size})")
    evald = (build_index(cfg.data.eval, max_samples=cfg.data.max_eval_samples)
             if cfg.data.eval else None)
    info = (evald.info if evald is not None else None) or train.info
    tokenizer = load_tokenizer_for(cfg, run_dir, train.captions)
    text_init = (glove_text_init(tokenizer, glove, cfg.model.dim, cfg.run.seed)
                 if glove is not None else None)
    start = read_train_state(ckpt)["step"] if ckpt is not None else 0
    if start > cfg.train.steps:
        raise ValueError(f"config key 'train.steps': {cfg.train.steps} is below the step of the "
                         f"checkpoint to resume from ({ckpt}, step {start}); raise it, or start "
                         f"over with --no-resume")
    if ckpt is not None:
        log.info("resuming from %s at step %d", ckpt, start)
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    spec = RunSpec(cfg=cfg, run_dir=str(run_dir), start=start, end=end,
                   tokenizer_json=tokenizer.to_str(), train_location=train.location,
                   train_samples=len(train), skipped=train.skipped.as_metrics(),
                   eval_location=evald.location if evald is not None else None, info=info,
                   resume_from=str(ckpt) if ckpt is not None else None, text_init=text_init)
    return spec, train, evald


def glove_path(cfg: Config) -> Path | None:
    """``tokenizer.glove``, checked before the data is indexed: a wrong path fails at once."""
    if cfg.tokenizer.glove is None:
        return None
    path = Path(cfg.tokenizer.glove)
    if not path.is_file():
        raise ConfigError(f"config key 'tokenizer.glove': {cfg.tokenizer.glove!r} is not a file"
                          f"{'' if path.exists() else ' (it does not exist)'}")
    return path


def load_tokenizer_for(cfg: Config, run_dir: Path, captions):
    """The run's tokenizer: kept from an earlier start, loaded from a file, or trained."""
    saved = run_dir / "tokenizer.json"
    if saved.exists():  # a resumed run keeps the vocabulary its weights were trained with
        return load_tokenizer(saved)
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:  # GloVe's words fill the vocabulary left after the captions' (tokenizer.py)
        extra = glove_words(glove_path(cfg)) if cfg.tokenizer.glove else ()
        tokenizer = train_tokenizer(captions, cfg.tokenizer.vocab_size, extra)
    save_tokenizer(tokenizer, saved)
    return tokenizer


def build_model(cfg: Config, vocab: int, backend: MoEBackend | None = None) -> VisionLanguageModel:
    torch.manual_seed(cfg.run.seed)  # the dense initialisation depends on the seed alone
    return VisionLanguageModel(cfg.model, image_size=cfg.data.image_size, vocab_size=vocab,
                               context_length=cfg.tokenizer.context_length, backend=backend,
                               seed=cfg.run.seed)


def model_for_tokenizer(cfg: Config, tokenizer, backend: MoEBackend | None = None):
    return build_model(cfg, vocab_size(tokenizer), backend)


def model_for_run(spec: RunSpec, tokenizer, backend: MoEBackend | None = None):
    """The model a training process starts from, the same in every process: the seeded
    initialisation, with ``tokenizer.glove``'s rows on a fresh start (a resumed one, or a Ray
    recovery from a checkpoint, loads its embeddings over them anyway)."""
    model = model_for_tokenizer(spec.cfg, tokenizer, backend)
    if spec.text_init is not None and spec.resume_from is None:
        apply_text_init(model, spec.text_init)
    return model

"""``expertpar eval``: evaluate a finished (or interrupted) run from its directory alone."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from ..config import Config, load_config
from ..data import SampleIndex, load_tokenizer
from ..eval import evaluate
from ..model import VisionLanguageModel
from ..train.checkpoint import CheckpointError, latest_checkpoint, read_shards, read_train_state
from ..train.loop import dense_owner
from ..train.setup import model_for_tokenizer, pick_device


def evaluate_run(run_dir: Path, *, data: str | None = None) -> dict[str, float]:
    cfg = load_run_config(run_dir)
    source = data or cfg.data.eval
    if not source:
        raise ValueError(f"{run_dir / 'config.yaml'} has no data.eval; pass --data PATH")
    model, tokenizer, step = load_run_model(run_dir, cfg)
    device = pick_device(cfg.train.device)
    index = SampleIndex.build(source, max_samples=cfg.data.max_eval_samples)
    metrics = {"step": step,
               **evaluate(model.to(device), index, tokenizer, cfg, info=index.info,
                          device=device)}
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def load_run_config(run_dir: Path) -> Config:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: is '{run_dir}' a run directory?")
    return load_config(cfg_path)


def load_run_model(run_dir: Path, cfg: Config) -> tuple[VisionLanguageModel, Tokenizer, int]:
    """The run's newest checkpoint that verifies, as an in-process model on the CPU, with the
    run's tokenizer and the checkpoint's step."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'}")
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model = model_for_tokenizer(cfg, tokenizer)
    # The in-process model holds every parameter: the whole checkpoint, no optimizer state.
    dense_owner(model, cfg).load(read_shards(ckpt, verified=True), where=str(ckpt),
                                 optimizer_state=False)
    return model, tokenizer, read_train_state(ckpt)["step"]

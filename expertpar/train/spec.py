"""What the driver decides before the first step, and hands every worker.

Its own module, light on imports (no torch, model or data pipeline): Ray Train's controller
unpickles it with the workers' payload, and every import there delays each start and recovery
of a Ray job.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..data.catalog import DatasetInfo


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

"""The in-process runtime: the whole model here, one owner, batches read from the index."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer

from ..config import Config
from ..data import Batch, SampleIndex, train_batches
from .checkpoint import read_shards
from .loop import TrainResult, dense_owner, nothing_to_do, run
from .spec import RunSpec
from .setup import model_for_run, open_run, pick_device, prepare_run
from .step import SingleProcess


class LocalRuntime:
    def __init__(self, spec: RunSpec, index: SampleIndex, evald: SampleIndex | None = None):
        cfg = spec.cfg
        self.cfg, self.index, self.evald = cfg, index, evald
        self.tokenizer = Tokenizer.from_str(spec.tokenizer_json)
        self.device = pick_device(cfg.train.device)
        self.model = model_for_run(spec, self.tokenizer).to(self.device)
        self.owners = [dense_owner(self.model, cfg)]
        self.comm = SingleProcess()
        if spec.resume_from:
            # open_run verified the checkpoint when it chose it
            self.owners[0].load(read_shards(Path(spec.resume_from), verified=True),
                                where=spec.resume_from)

    def batches(self, start: int, end: int) -> Iterator[Batch]:
        return train_batches(self.index, self.cfg, self.tokenizer, start=start, end=end)

    def eval_data(self) -> SampleIndex | None:
        return self.evald  # the object itself: an index kept in memory has no location to open

    def report(self, step: int, metrics: dict, checkpoint: Path | None) -> None:
        pass  # metrics.jsonl and the checkpoint directory are all there is in process

    def stop_requested(self, done: int) -> str | None:
        return None  # one process: nothing to move


def train_local(cfg: Config, *, resume: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train as ``cfg`` says in this process; ``stop_after`` ends after that many steps."""
    spec, index, evald = prepare_run(cfg, open_run(cfg, resume=resume), stop_after=stop_after)
    if spec.start == spec.end:
        return nothing_to_do(spec)
    return run(spec, LocalRuntime(spec, index, evald))

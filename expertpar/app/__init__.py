"""The application layer: the command line, the Ray job's driver, evaluation of a run
directory, the run report, and the benchmark. Library code (config, data, model, moe, eval,
train, distributed) never imports from here."""
from __future__ import annotations

from ..config import Config
from ..train.local import train_local
from ..train.loop import TrainResult


def train(cfg: Config, *, resume: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train as ``cfg`` says, in this process or on Ray (``distributed.backend``);
    ``stop_after`` ends after that many steps (tests, fault injection)."""
    if cfg.distributed.backend == "ray":
        from .ray_job import train_ray  # Ray is imported only when it is used
        return train_ray(cfg, resume=resume, stop_after=stop_after)
    return train_local(cfg, resume=resume, stop_after=stop_after)


__all__ = ["train"]

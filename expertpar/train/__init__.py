"""Training: the one loop and its runtimes' shared parts — step, parameter owners, optimizer
and schedule, CLIP loss, checkpoints and their names, metrics."""
from .local import train_local
from .loop import RunSpec, TrainResult, run

__all__ = ["RunSpec", "TrainResult", "run", "train_local"]

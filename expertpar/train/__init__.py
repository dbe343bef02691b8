"""Training: optimizer and schedule, CLIP loss, checkpoints, metrics, the in-process loop."""
from .loop import TrainResult, train

__all__ = ["TrainResult", "train"]

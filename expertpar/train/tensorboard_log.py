"""The metrics as TensorBoard scalars: event files in the run directory, beside metrics.jsonl.

Written by the lead process only, from the same records as metrics.jsonl, so the two always say
the same thing; ``tensorboard --logdir runs`` shows every run under ``runs/`` by its name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class ScalarEvents:
    """Every number of a metrics record (but its step) as a scalar at that step."""

    def __init__(self, run_dir: Path, *, resume_step: int):
        # Imported here: it pulls in the tensorboard package, which only this writer needs.
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(f"train.tensorboard is true but TensorBoard's writer cannot be "
                              f"imported ({err}): install the tensorboard package, or set "
                              f"train.tensorboard: false") from err

        # A resumed run repeats the steps after its checkpoint, and an interrupted run may have
        # logged some of them already. purge_step makes TensorBoard's readers drop every event
        # at or after it from the earlier files, so each step is shown once. Records at the
        # checkpoint's own step describe the state it holds and are kept, as MetricsLog keeps
        # them: hence resume_step + 1. A start from step 0 with files of an attempt that died
        # before its first checkpoint purges all of that attempt (--no-resume sets them aside).
        self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if "event" in record:  # run start, first step: bookkeeping, not curves (metrics.jsonl)
            return
        step = int(record["step"])
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self._writer.add_scalar(key, float(value), step)
        # Records come every train.log_every steps: flushing each keeps what a killed process
        # logged on disk, as metrics.jsonl does, at the cost of one small write.
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


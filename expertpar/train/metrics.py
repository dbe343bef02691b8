"""Metrics as JSON lines, and the one-line progress report."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .tensorboard_log import ScalarEvents

log = logging.getLogger("expertpar")


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, what an interrupted run logged after the
    checkpoint it resumes from goes (those steps are run again). With ``tensorboard``, the
    same records also go to TensorBoard event files in the same directory."""

    def __init__(self, path: Path, *, resume_step: int = 0, tensorboard: bool = False):
        self.path = path
        if path.exists():
            kept = [json.dumps(r, sort_keys=True) for r in read_metrics(path)
                    if _before(r, resume_step)]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self._events = ScalarEvents(path.parent, resume_step=resume_step) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._events is not None:
            self._events.write(record)

    def close(self) -> None:
        """Closes the event file (metrics.jsonl is opened per record and needs nothing)."""
        if self._events is not None:
            self._events.close()


def _before(record: dict, resume_step: int) -> bool:
    step = record.get("step", 0)
    # Step-N records describe the state after N steps, which the checkpoint holds; the start
    # event at N belongs to the run being replaced.
    return step < resume_step or (step == resume_step and "event" not in record)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line cut short (a process killed while writing
    it) is left out with a warning; any other line that is not JSON is an error naming it."""
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):
                log.warning("%s:%d: the last line was cut short (%s); left out", path, n, err)
                continue
            raise ValueError(f"{path}:{n} is not a JSON metrics record ({err})") from None
    return records


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, steps: int, loss: float, tokens_per_s: float,
                  eta_s: float, extra: str = "") -> str:
    return (f"step {step:>6}/{steps} | loss {loss:7.4f} | {tokens_per_s:9.0f} tok/s | "
            f"eta {format_duration(eta_s)}" + (f" | {extra}" if extra else ""))


def eval_line(step: int, m: dict[str, float]) -> str:
    parts = [f"eval @ {step}:"]
    for key in ("zero_shot/top1", "zero_shot/top5", "retrieval/image_to_text/R@1",
                "retrieval/text_to_image/R@1", "retrieval/image_to_text/R@5",
                "caption/bleu4", "caption/cider", "caption/exact_match"):
        if key in m:
            parts.append(f"{key}={m[key]:.3f}")
    return " ".join(parts)

"""What the Ray job recovers from by itself, and the record of each recovery.

A *loss* is a process the job needs and no longer has: an expert actor or router that died or
stopped answering within ``experts.call_timeout_s``, a Ray Train worker that died, a node that
went away with any of them, a preemption. The driver (app/ray_job.py) recovers from a loss
the one way that fits every case: it stops what is left, restores every parameter owner
(dense, gates, experts) from the newest checkpoint that verifies, places the expert shards on
the nodes that exist now and runs the remaining steps. Every source of randomness is a
function of (seed, step), so the run goes on exactly as an uninterrupted one would have.

Anything else a step raises (a bug, a bad sample, a refused config) is not a loss: it would
fail the same way again, so the job stops and says so.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import ray.exceptions

from ..train.metrics import read_metrics
from .calls import PeerLost

log = logging.getLogger("expertpar")

RECOVERIES_FILE = "recoveries.json"

# Ray's words for "a process or node is gone"; PeerLost is ours (calls.py).
_LOST = (PeerLost, ray.exceptions.RayActorError, ray.exceptions.NodeDiedError,
         ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
         ray.exceptions.OwnerDiedError)


def _causes(err: BaseException, where: str = "") -> Iterator[tuple[str, BaseException]]:
    """``err`` and every exception inside it, each with the train worker it came from ("" when
    none): Ray Train wraps worker errors in its own (WorkerGroupError, with one per rank), and
    Ray wraps exceptions that crossed a process boundary."""
    seen: set[int] = set()
    todo = [(where, err)]
    while todo:
        where, e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield where, e
        for rank, failure in (getattr(e, "worker_failures", None) or {}).items():
            todo.append((f"train worker {rank}", failure))
        for attr in ("__cause__", "__context__", "_base_exc", "health_check_failure",
                     "controller_failure", "cause"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                todo.append((where, inner))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_loss(err: BaseException, lost_actors: list[str]) -> str | None:
    """What was lost, in words, when ``err`` (what ``TorchTrainer.fit`` raised) is a loss;
    None when it is not one. ``lost_actors``: the MoE actors found dead or silent."""
    from ray.train.v2._internal.exceptions import (WorkerHealthCheckFailedError,
                                                   WorkerHealthCheckTimeoutError)
    from ray.train.v2.api.exceptions import PreemptionError

    # The MoE actors' own state names the culprit best: a worker's error about one is a symptom.
    parts = [f"{name} died or stopped answering" for name in lost_actors]
    if not parts:
        for where, e in _causes(err):
            if isinstance(e, PreemptionError):
                info = e.preemption_info
                parts.append(f"preemption of nodes {info.preempted_node_ids} (train workers "
                             f"{info.preempted_ranks})")
            elif isinstance(e, (WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError)):
                parts.append(f"{where or 'a train worker'} died ({_first_line(e)})")
            elif isinstance(e, PeerLost):
                parts.append(_first_line(e))  # it names the culprit; every worker says so
            elif isinstance(e, _LOST):
                parts.append(f"{where + ': ' if where else ''}{_first_line(e)}")
    unique = list(dict.fromkeys(parts))
    return "; ".join(unique) if unique else None


def root_error(err: BaseException) -> str:
    """A worker's own exception inside ``err``, in one line (else ``err``'s first line)."""
    for _, e in _causes(err):
        failures = getattr(e, "worker_failures", None) or {}  # Ray Train's, by rank
        candidates = [failures[r] for r in sorted(failures)]
        if hasattr(e, "_base_exc"):  # Ray Train's wrapper of a worker's exception
            candidates.append(e._base_exc)
        for inner in candidates:
            inner = getattr(inner, "_base_exc", inner)
            if isinstance(inner, BaseException):
                return f"{type(inner).__name__}: {_first_line(inner)}"
    return f"{type(err).__name__}: {_first_line(err)}"


@dataclass
class Recovery:
    loss: str  # what was lost, in words
    failed_at_step: int  # the last step logged before the loss
    resumed_from_step: int  # the checkpoint's step every owner restored
    steps_lost: int  # finished steps run again
    lost_at_unix: float  # when the driver heard of the loss
    checkpoint: str | None  # the checkpoint resumed from (None: from the start)
    recovery_s: float | None = None  # from the loss to the first step done after it
    # a move the job chose (a preemption notice, a joining node: distributed/elastic.py) at a
    # checkpoint it had just written; not a loss, and not counted by train.max_recoveries
    planned: bool = False


class Recoveries:
    """The job's recoveries, in ``recoveries.json`` of the run directory (rewritten at each
    one, so the record survives the driver) and in the log."""

    def __init__(self, run_dir: Path, limit: int):
        self.path = run_dir / RECOVERIES_FILE
        self.limit = limit
        self.done: list[Recovery] = []  # this call's (max_recoveries counts the losses)
        # An earlier call's recoveries of this run (it stopped; this one resumed it) stay on
        # record; a fresh run (--no-resume) set the whole directory aside first.
        self.earlier = json.loads(self.path.read_text()) if self.path.exists() else []

    def add(self, loss: str, checkpoint: Path | None, resumed_from: int, *,
            planned: bool = False) -> Recovery:
        """Book a loss (or a ``planned`` move); raises RuntimeError past
        ``train.max_recoveries`` losses, naming every loss and the last good checkpoint."""
        self._measure()  # before the next attempt rewrites the metrics log
        failed_at = last_logged_step(self.path.parent)
        r = Recovery(loss, failed_at, resumed_from, max(0, failed_at - resumed_from),
                     time.time(), str(checkpoint) if checkpoint else None, planned=planned)
        losses = [x.loss for x in self.done if not x.planned]
        if not planned and len(losses) >= self.limit:
            losses.append(loss)
            raise RuntimeError(
                f"training stopped after {len(losses)} losses, past train.max_recoveries="
                f"{self.limit}: " + "; ".join(f"({i}) {x}" for i, x in enumerate(losses, 1)) +
                f". The last good checkpoint is {checkpoint or 'none'}; run the same command "
                f"again to resume from it.")
        self.done.append(r)
        self.write()
        if planned:
            log.warning("moving: %s. Resuming from %s (step %d) on the nodes there now", loss,
                        checkpoint, resumed_from)
        else:
            log.warning("lost: %s. Recovery %d of at most %d: resuming from %s (step %d; %d "
                        "finished steps to run again)", loss, len(losses) + 1, self.limit,
                        checkpoint or "the start", resumed_from, r.steps_lost)
        return r

    def _measure(self) -> None:
        """Each recovery's time, from the loss to the first step done after it (the metrics
        log's wall times), once that step is on record."""
        todo = [r for r in self.done if r.recovery_s is None]
        path = self.path.parent / "metrics.jsonl"
        if not todo or not path.exists():
            return
        starts = [m["time/unix"] for m in read_metrics(path) if m.get("event") == "first_step"]
        for r in todo:
            after = [t for t in starts if t > r.lost_at_unix]
            r.recovery_s = min(after) - r.lost_at_unix if after else None
        self.write()

    def finish(self) -> None:
        """Once the run is over: the recoveries' times, on record and in the log."""
        if not self.done:
            return
        self._measure()
        log.info("recovered from %d losses and moves: %s", len(self.done), "; ".join(
            f"{r.loss} at step {r.failed_at_step}: {r.steps_lost} steps lost, back in "
            + (f"{r.recovery_s:.1f}s" if r.recovery_s is not None else "an unknown time")
            for r in self.done))

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([*self.earlier, *(asdict(r) for r in self.done)], indent=1))
        tmp.replace(self.path)


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((m.get("step", 0) for m in read_metrics(path) if "event" not in m), default=0)

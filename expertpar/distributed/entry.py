"""What the driver hands Ray Train: the function every worker runs, and its payload.

Light on imports on purpose: Ray Train's controller unpickles both before any worker starts,
on every start and every recovery of a job, and importing the model, the loop and the data
pipeline there would cost seconds of CPU each time (torch itself comes to the controller with
Ray's own TorchConfig). The worker imports the rest (runtime.py) when it runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..train.spec import RunSpec


@dataclass(frozen=True)
class WorkerPayload:
    """What the driver hands every Ray Train worker (``train_loop_config["payload"]``)."""
    spec: RunSpec
    routers: list  # the router actors' handles (experts.num_routers)
    console: object  # a ray.util.queue.Queue the driver prints from (see app/ray_job.py)
    log_level: int = logging.INFO
    signal: object = None  # the driver's StopSignal actor (distributed/elastic.py)


def train_worker(config: dict) -> None:
    """The function Ray Train runs on every worker: wiring only."""
    from .runtime import run_worker
    run_worker(config["payload"])

"""The Ray runtime of the training loop, on each Ray Train worker.

The worker runs the dense model data-parallel; its MoE layers are bridges to the router actor,
which owns the gates and speaks for the expert actors that own the experts. Batches stream from
Ray Data through this worker's dataset shard. Everything else — schedule, logging, evaluation,
checkpoints — is the one loop in train/loop.py.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import ray
import ray.train
import ray.train.torch
import torch
from tokenizers import Tokenizer

from ..data import Batch, SampleIndex
from ..train.checkpoint import read_shards
from ..train.loop import dense_owner, run
from ..train.names import DENSE_FILE
from ..train.setup import model_for_run, pick_device
from ..train.step import SingleProcess, TorchDistributed
from .bridge import RayBackend
from .calls import wait_for
from .data import dataset_name, iter_worker_batches
from .entry import WorkerPayload

log = logging.getLogger("expertpar")


class RemoteOwner:
    """The gates and experts, as one parameter owner behind the router actor.

    Gradient norms arrive with the backward replies (bridge.py); the optimizer step is sent by
    the lead worker and not waited for: the router applies it before any call that names it
    in ``after``, so the dense step, the next batch and the MoE step overlap.
    """

    def __init__(self, backend: RayBackend, *, lead: bool):
        self.backend = backend
        self.router = backend.router
        self.lead = lead
        self.deadline_s = backend.router_deadline_s  # see RayBackend
        self._step: int | None = None  # the step whose norms were taken last
        self._pending = None  # the lead's step call in flight

    def grad_norms(self, step: int) -> torch.Tensor:
        self._step = step
        norms = self.backend.take_norms(step)
        if norms is not None:
            return norms
        return wait_for(self.router.grad_norms.remote(step), "the router's gradient norms",
                        self.deadline_s)

    def step(self, lr: float, clip_coef: float) -> None:
        self.settle()  # the previous step's failure surfaces here, not silently
        if self._step is None:
            raise RuntimeError("RemoteOwner.step before grad_norms: the step has no number")
        if self.lead:  # one worker tells the router; every worker's next call waits for it
            self._pending = self.router.step.remote(self._step, lr, clip_coef)
        self.backend.stepped = self._step

    def skip(self) -> None:
        """Drop this step's gate and expert gradients everywhere, no update (a non-finite
        step). The lead tells the router and waits: every worker's next forward meets the
        lead's at the router, so none reaches an actor before the gradients are gone."""
        self.settle()
        if self.lead:
            wait_for(self.router.zero_grad.remote(), "the router's zero_grad", self.deadline_s)

    def settle(self) -> None:
        """Wait for the step in flight (before reading or dropping MoE state)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            wait_for(pending, "the router's optimizer step", self.deadline_s)

    def zero_grad(self) -> None:
        self.settle()
        wait_for(self.router.zero_grad.remote(), "the router's zero_grad", self.deadline_s)

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        self.settle()
        return wait_for(self.router.export.remote(), "the router's checkpoint export",
                        self.deadline_s)


class RayRuntime:
    def __init__(self, payload: WorkerPayload):
        spec, cfg = payload.spec, payload.spec.cfg
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        if self.device.type == "cuda":
            # Ray Train shows each worker every GPU its node gives the workers; this rank's is
            # the one for its local rank (plain "cuda" would put them all on the first).
            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        torch.set_num_threads(worker_threads(cfg.distributed.threads_per_worker,
                                             ctx.get_local_world_size()))
        self.comm = TorchDistributed() if world > 1 else SingleProcess()
        tokenizer = Tokenizer.from_str(spec.tokenizer_json)
        backend = RayBackend(payload.routers, rank=rank, world_size=world, device=self.device)
        self.model = model_for_run(spec, tokenizer, backend).to(self.device)
        dense = dense_owner(self.model, cfg)
        if spec.resume_from:
            dense.load(read_shards(Path(spec.resume_from), [DENSE_FILE], verified=True),
                       where=spec.resume_from)
        self.owners = [dense, RemoteOwner(backend, lead=rank == 0)]
        self.rank, self.world = rank, world
        self.eval_location = spec.eval_location
        self.signal, self.node_id = payload.signal, ray.get_runtime_context().get_node_id()
        self._question = None  # the stop signal's answer in flight (for the step before)
        self._stop: tuple[int, str] | None = None  # (step, reason) once one is fixed
        log.info("train worker %d of %d on %s (%s), %d torch threads", rank, world, self.device,
                 f"GPUs {ray.get_gpu_ids()}" if ray.get_gpu_ids() else "no GPU",
                 torch.get_num_threads())

    def batches(self, start: int, end: int) -> Iterator[Batch]:
        shard = ray.train.get_dataset_shard(dataset_name(self.rank))
        for batch in iter_worker_batches(shard, self.cfg, world=self.world):
            if not start <= batch.step < end:
                raise RuntimeError(f"worker {self.rank}: the data stream gave step {batch.step}"
                                   f" outside this run's steps [{start}, {end})")
            yield batch

    def eval_data(self) -> SampleIndex | None:
        return SampleIndex.open(self.eval_location) if self.eval_location else None

    def report(self, step: int, metrics: dict, checkpoint: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        ray.train.report(metrics, checkpoint=ckpt)

    def stop_requested(self, done: int) -> str | None:
        if self.signal is None:
            return None
        # Every worker asks the one signal actor, and reads its answer a step later (it has
        # come by then: no wait here); the stop step it fixes leaves room for that
        # (elastic.py). Without an answer, stopping alone would strand the others: the run
        # goes on, and a lost driver surfaces as a loss anyway.
        try:
            answer = ray.get(self._question, timeout=60) if self._question else None
            self._question = self.signal.poll.remote(self.rank, done, self.node_id)
        except Exception as err:  # noqa: BLE001
            log.warning("worker %d: the driver's stop signal did not answer (%s); carrying on "
                        "without it", self.rank, err)
            self.signal = self._question = None
            return None
        self._stop = answer or self._stop
        return self._stop[1] if self._stop and done >= self._stop[0] else None


def worker_threads(fixed: int | None, workers_on_node: int) -> int:
    """torch threads for a train worker's dense part: ``fixed``, else this node's cores shared
    by the workers on it (Ray sets OMP_NUM_THREADS to the CPUs reserved, often 1)."""
    return fixed or max(1, len(os.sched_getaffinity(0)) // max(1, workers_on_node))


def run_worker(payload: WorkerPayload) -> None:
    """One Ray Train worker's part of the run (entry.py's ``train_worker`` calls it)."""
    _log_to_driver(payload.console, payload.log_level)
    run(payload.spec, RayRuntime(payload))


class ConsoleHandler(logging.Handler):
    """Sends this worker's ``expertpar`` log records to the driver, which prints them as its
    own: the user sees progress lines without Ray's per-process prefixes and chatter, which
    stay in Ray's logs (the driver runs Ray with ``log_to_driver=False``)."""

    def __init__(self, console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.put_nowait((record.levelno, self.format(record)))
        except Exception:  # a full or lost console must never stop training  # noqa: BLE001
            self.handleError(record)


def _log_to_driver(console, level: int) -> None:
    log = logging.getLogger("expertpar")
    log.setLevel(level)
    for handler in list(log.handlers):
        if isinstance(handler, ConsoleHandler):
            log.removeHandler(handler)
    log.addHandler(ConsoleHandler(console))
    log.propagate = False

"""The Ray path's driver: attach to (or start) Ray, index the data, start the expert actors and
the router, run the one training loop on Ray Train workers, stop every actor even on failure.

Data never passes through here: the driver indexes the shards with Ray tasks (index rows only,
no image bytes), and every worker streams its own batches from Ray Data.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path

import ray

from ..config import Config
from ..distributed.actors import MoEActors, launch_moe_actors
from ..distributed.data import build_index_on_ray, train_data_config, train_datasets
from ..distributed.elastic import (Watcher, actor_count, job_shapes, start_stop_signal,
                                   total, worker_shape)
from ..distributed.recovery import Recoveries, describe_loss, root_error
from ..distributed.ray_start import start_embedded
from ..distributed.entry import WorkerPayload, train_worker
from ..train.checkpoint import latest_checkpoint, read_train_state
from ..train.loop import TrainResult, nothing_to_do
from ..train.spec import RunSpec
from ..train.setup import open_run, prepare_run

log = logging.getLogger("expertpar")


def ray_init(cfg: Config) -> bool:
    """Attach to a cluster (distributed.address, else RAY_ADDRESS) or start an embedded Ray.

    Returns True when this call started Ray (so the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    if not sys.stderr.isatty():
        # Ray colours the prefix of the few lines it prints itself (the raylet's warnings);
        # colour codes belong on a terminal only.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = cfg.distributed.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning",
                                **forwarded_environment(attached=bool(address))}}
    # Ray's own messages stay in its log files (`--verbose` shows them); workers' progress
    # lines reach the console through the driver (see relay_console).
    quiet = dict(log_to_driver=False, logging_level=logging.DEBUG
                 if log.getEffectiveLevel() <= logging.DEBUG else logging.ERROR)
    if address:
        ray.init(address=address, runtime_env=runtime_env, **quiet)
    else:
        # Logical CPUs: enough for the workers, the expert actors and the Ray Data actors even
        # on a 2-core machine (the OS shares the cores; Ray only counts).
        need = total(job_shapes(cfg)).get("CPU", 0.0) + 2
        num_cpus = cfg.distributed.embedded_num_cpus or max(os.cpu_count() or 1, int(need + 0.5))
        # The dashboard serves the state API that Ray Train's clean-up polls; it listens on
        # 127.0.0.1 only.
        start_embedded(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       runtime_env=runtime_env, **quiet)
    return True


@contextmanager
def relay_console():
    """A queue the train workers log into, printed here by the driver's logger while the job
    runs (so ``--quiet`` and log redirection work for worker lines too)."""
    from ray.util.queue import Empty, Queue

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                level, text = queue.get(timeout=0.2)
            except Empty:
                if done.is_set():
                    return
                continue
            except Exception as err:  # the queue actor is gone: say so, once  # noqa: BLE001
                log.warning("the train workers' console was lost (%s); their lines are in "
                            "Ray's logs", err)
                return
            log.log(level, "%s", text)

    thread = threading.Thread(target=drain, name="expertpar-console", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join(timeout=10)
        ray.kill(queue.actor)


FORWARDED = ("AWS_", "GOOGLE_", "EXPERTPAR_")  # object-store settings, endpoints, index cache
# Never passed on through Ray: Ray writes a runtime environment, env_vars included, to its logs
# (runtime_env_agent.log) and keeps it in the GCS.
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY")


def forwarded_environment(attached: bool = True) -> dict[str, str]:
    """The driver's storage settings for every Ray worker, actor and task of a cluster it
    attaches to (an embedded Ray's processes inherit this environment): endpoints, regions,
    EXPERTPAR_*; never a credential (the nodes need their own: an instance role, or the
    variables in the environment of `ray start`)."""
    if not attached:
        return {}
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    withheld = sorted(k for k in env if any(w in k.upper() for w in SECRET_WORDS))
    if withheld:
        log.warning("not passed to the cluster's workers (Ray writes a job's environment to its "
                    "logs): %s; give the nodes their own credentials (an instance role, or these "
                    "variables in the environment of `ray start`)", ", ".join(withheld))
    return {k: v for k, v in env.items() if k not in withheld}


def scaling(cfg: Config) -> dict:
    """Ray Train's ScalingConfig arguments: the workers' count, CPUs and GPU shares."""
    d = cfg.distributed
    return {"num_workers": d.num_workers, "use_gpu": d.use_gpu,
            "resources_per_worker": worker_shape(cfg)}


def train_ray(cfg: Config, *, resume: bool = True, stop_after: int | None = None,
              callbacks: Sequence = ()) -> TrainResult:
    """Train on Ray as ``cfg`` says; ``callbacks`` (Ray Train UserCallbacks, e.g. Tune's
    TuneReportCallback in a sweep's trial) go to every fit, recoveries' included."""
    times: dict[str, float] = {}
    pool, starting = ThreadPoolExecutor(1), None
    t_setup = t = time.perf_counter()
    started = ray_init(cfg)
    times["Ray"] = time.perf_counter() - t
    moe = None
    try:
        ckpt = open_run(cfg, resume=resume)
        # The actors start (processes, imports, their checkpoint shards) while the data is
        # indexed: neither needs the other. Not with a range of actors: their count is what
        # the cluster holds, which the indexing tasks would hide.
        if not cfg.experts.elastic:
            starting = pool.submit(_timed, place_moe_actors, cfg, ckpt)
        t = time.perf_counter()
        build_index = partial(build_index_on_ray,
                              max_in_flight=(os.cpu_count() or 1) if started else None)
        spec, _, _ = prepare_run(cfg, ckpt, stop_after=stop_after, build_index=build_index)
        if spec.start == spec.end:
            return nothing_to_do(spec)
        times["data index and tokenizer"] = time.perf_counter() - t
        if starting is None:
            starting = pool.submit(_timed, place_moe_actors, cfg, ckpt)
        (moe, seconds), starting = starting.result(), None
        times[f"{len(moe.actors)} expert actors placed"] = seconds
        run_dir = cfg.run_dir.resolve()
        times["total"] = time.perf_counter() - t_setup
        log.info("set-up %s", ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
        recoveries = Recoveries(run_dir, cfg.train.max_recoveries)
        while True:
            # The actors finish starting (processes, imports, checkpoint shards) while Ray
            # Train starts its workers; a worker's first call waits for them.
            finishing = pool.submit(_finish_start, cfg, moe, run_dir)
            try:
                result = _fit(cfg, spec, moe, callbacks)
            except Exception as err:
                if finishing.exception() is not None:  # they never came up: not a loss
                    raise RuntimeError(f"the MoE actors did not start: "
                                       f"{finishing.exception()}") from finishing.exception()
                loss = describe_loss(err, moe.lost_actors())
                last = latest_checkpoint(run_dir / "checkpoints")
                if loss is None:  # not a loss: a bug or bad data would fail the same way again
                    raise RuntimeError(
                        f"training failed: {root_error(err)}. The last good checkpoint is "
                        f"{last or 'none'}; run the same command again to resume from it."
                    ) from err
                moved = None
            else:
                finishing.result()
                moved = (result.metrics or {}).get("stopped")
                if not moved:
                    break
                loss, last = moved, latest_checkpoint(run_dir / "checkpoints")
            # Whatever is left of the MoE side holds state past the checkpoint (after a loss)
            # or sits where it should not (after a planned stop): it goes, and every owner
            # restores from the newest checkpoint that verifies.
            moe.shutdown()
            moe = None
            spec = resume_spec(spec, last)
            recoveries.add(loss, last, spec.start, planned=bool(moved))
            t = time.perf_counter()
            try:
                moe = place_moe_actors(cfg, last)
            except Exception as restart:
                raise RuntimeError(
                    f"{'moving' if moved else 'lost'}: {loss}; the MoE actors could not be "
                    f"restarted ({restart}). The last good checkpoint is {last or 'none'}; run "
                    f"the same command again to resume from it once the cluster has room."
                ) from restart
            log.info("%d expert actors placed again in %.1fs", len(moe.actors),
                     time.perf_counter() - t)
        recoveries.finish()
        final = result.metrics or {}
        return TrainResult(run_dir, spec.end, final.get("loss/total", float("nan")),
                           final.get("eval", {}), final.get("losses", []),
                           recoveries=[asdict(r) for r in recoveries.done])
    finally:
        try:
            if moe is None and starting is not None and starting.exception() is None:
                moe = starting.result()[0]  # set-up failed elsewhere; the actors still go
            pool.shutdown()
            if moe is not None:
                moe.shutdown()
        finally:
            if started:
                ray.shutdown()


def place_moe_actors(cfg: Config, checkpoint: Path | None) -> MoEActors:
    """The expert actors (as many as the cluster holds now, for a range) and the routers,
    placed and starting (``_finish_start`` waits for them)."""
    return launch_moe_actors(cfg, str(checkpoint) if checkpoint else None,
                             num_actors=actor_count(cfg))


START_TIMEOUT_S = 600.0


def _finish_start(cfg: Config, moe: MoEActors, run_dir: Path) -> None:
    t = time.perf_counter()
    # Starting includes reading the checkpoint's shards (minutes, for a big model): its own
    # bound, not the hot path's experts.call_timeout_s, which may be seconds.
    moe.finish_start(cfg.experts.threads_per_actor,
                     timeout_s=max(START_TIMEOUT_S, cfg.experts.call_timeout_s))
    _write_topology(run_dir, moe, cfg)
    log.info("%d expert actors and the router up in %.1fs, beside Ray Train's start",
             len(moe.actors), time.perf_counter() - t)


def _fit(cfg: Config, spec: RunSpec, moe: MoEActors, callbacks: Sequence = ()):
    """One Ray Train run of the steps ``spec`` names, on the workers' data streams, until its
    end or a planned stop (distributed/elastic.py); ``callbacks`` see its reports."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = Path(spec.run_dir)
    signal = start_stop_signal(spec.start, cfg.train.checkpoint_every)
    # Leaving the block prints every worker line still queued, before the lines below.
    with relay_console() as console, Watcher(cfg, signal, moe):
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"payload": WorkerPayload(spec, moe.routers, console,
                                                        log.getEffectiveLevel(), signal)},
            datasets=train_datasets(spec.train_location, cfg, spec.tokenizer_json,
                                    start=spec.start, end=spec.end),
            # Each worker reads its own dataset (its slice of every global batch, in order).
            dataset_config=train_data_config(),
            scaling_config=ScalingConfig(**scaling(cfg)),
            run_config=RunConfig(
                name=cfg.run.name, storage_path=str(run_dir / "ray_train"),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                callbacks=list(callbacks),
                # Ray Train must not restart workers on its own, not even after a preemption
                # (its default retries those forever): a restarted worker would replay from
                # the launch-time step while the actors keep their advanced state. Every
                # restart goes through train_ray's recovery, which restores every owner.
                # Only a worker group that failed to start counts against the controller's
                # limit (nothing has run then, so a retry is safe); a few, not forever.
                # A preemption notice is handled here too (elastic.py): the workers stop at a
                # just-in-time checkpoint; Ray Train neither relaxes its collectives nor keeps
                # workers past the drain deadline.
                failure_config=FailureConfig(max_failures=0, max_preemption_failures=0,
                                             controller_failure_limit=3,
                                             relax_collectives_on_preemption=False,
                                             preemption_grace_s=0.0)))
        t_fit = time.perf_counter()
        try:
            result = trainer.fit()
        finally:
            ray.kill(signal)
    log.info("training %s in %.1fs", "stopped" if (result.metrics or {}).get("stopped")
             else "finished", time.perf_counter() - t_fit)
    return result


def resume_spec(spec: RunSpec, checkpoint: Path | None) -> RunSpec:
    """The same run's remaining steps, from ``checkpoint`` (None: from the start)."""
    start = read_train_state(checkpoint)["step"] if checkpoint else 0
    return dataclasses.replace(spec, start=start,
                               resume_from=str(checkpoint) if checkpoint else None)


def _write_topology(run_dir: Path, moe: MoEActors, cfg: Config) -> None:
    (run_dir / "ray_topology.json").write_text(json.dumps(
        {"expert_actors": moe.infos,
         "router": {"node_id": moe.router_node, "device": moe.router_device},
         "routers": moe.router_infos,
         "num_workers": cfg.distributed.num_workers},
        indent=1, default=str))


def _timed(fn, *args):
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t

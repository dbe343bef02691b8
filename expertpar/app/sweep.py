"""``expertpar sweep``: a Ray Tune search over the MoE's knobs, each trial a whole Ray run.

A trial is a Tune function trainable that runs ``train_ray`` (what ``expertpar train`` runs on
Ray) on the base job with the sampled knobs: its own expert actors and router, its own Ray
Train run, its own run directory OUT/trials/<trial id>/. The Train workers' reports (one per
checkpoint, with the newest evaluation) reach Tune through Ray Train V2's TuneReportCallback in
the run's RunConfig, and ASHA stops the weak trials at its rungs. Tune ends a stopped trial's
actor, and the actors it owns (its expert actors, its Ray Train run) die with it; the placement
group its expert actors held does not (Ray scopes it to the job), so the sweep removes it.

Sizing: a trial's own actor only waits, so it reserves next to no CPU; what a trial holds is
its run (distributed/elastic.py's ``job_shapes``: train workers, their Ray Data, expert
actors, routers). As many trials run at once as the cluster's free resources hold, node by
node, beside one spare CPU for index scans and Ray Data's read tasks; a trial that could
never fit stops the sweep before it starts.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import PlacementGroupID, tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.util import list_named_actors
from ray.util.placement_group import (PlacementGroup, placement_group_table,
                                      remove_placement_group)

from ..config import Config, config_to_dict
from ..data import storage
from ..distributed.data import build_index_on_ray
from ..distributed.elastic import (Resources, fit_count, free_resources, job_shapes,
                                   total)
from ..distributed.wire import sweep_dead
from .ray_job import ray_init, train_ray
from .sweep_config import SearchDim, Sweep, describe, load_sweep, trial_config
from .sweep_results import (best_job, best_row, cell, ranked, sweep_figure, table,
                            write_csv)

log = logging.getLogger("expertpar")

# The trial's own actor waits on its Ray Train run; Tune needs a bundle that is not empty.
TRIAL_CPUS = 0.01
# Kept free beside the trials: index scans and the Ray Data read tasks that feed the workers.
SPARE = {"CPU": 1.0}


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]  # one per trial, best first (sweep_results.py's columns)
    best: dict | None
    table: str
    at_once: int  # trials that ran at once


def run_sweep(path: str | Path, out: str | Path,
              overrides: tuple[str, ...] | list[str] = ()) -> SweepResult:
    """Run the sweep file ``path`` (``overrides`` set base-job keys) into ``out``: trials/,
    tune/ (Tune's own records), results.csv, best.yaml and sweep.png."""
    sweep = load_sweep(path, overrides)
    out = Path(out).resolve()
    if (out / "trials").exists() or (out / "results.csv").exists():
        raise ValueError(f"--out {out} already holds a sweep; choose another directory")
    sc = sweep.config
    # Standard output carries the table only: what Tune prints there even when told to be
    # silent (verbose=0), and Ray's warnings, go to standard error with the progress lines.
    with redirect_stdout(sys.stderr):
        # An embedded Ray holds the heaviest trial at least (more where the cores allow).
        started = ray_init(max((cfg for _, cfg in sweep.extremes), key=_cpus))
        try:
            at_once = trials_at_once(sweep, free_resources())
            log.info("sweep %s: %d trial%s of %s, %d at a time, %s %s; each trial a Ray run "
                     "in %s", sweep.path, sc.num_samples, "s" if sc.num_samples != 1 else "",
                     ", ".join(sweep.knobs), at_once, sc.mode, sc.metric, out / "trials")
            _index_once(sweep.base, started)
            grid = _tune(sweep, out, at_once)
            rows = [trial_row(result, sweep) for result in grid]
        finally:
            if started:
                ray.shutdown()
    rows = ranked(rows, sc.metric, sc.mode)
    write_csv(rows, sweep.knobs, sc.metric, out / "results.csv")
    text = table(rows, sweep.knobs, sc.metric)
    best = best_row(rows, sc.metric, sc.mode)
    if best is None:
        raise RuntimeError(f"no trial reported {sc.metric}; each trial's error is in "
                           f"{out / 'results.csv'}:\n{text}")
    (out / "best.yaml").write_text(best_job(sweep.base, best, sweep.knobs,
                                            sweep_file=sweep.path, metric=sc.metric))
    sweep_figure(rows, sc.space, sc.metric, sc.mode, out / "sweep.png")
    failed = [r for r in rows if r["error"]]
    if failed:
        log.warning("%d trial%s failed: %s", len(failed), "s" if len(failed) > 1 else "",
                    "; ".join(f"{r['trial']}: {r['error']}" for r in failed))
    return SweepResult(out, rows, best, text, at_once)


def trial_shapes(cfg: Config) -> list[Resources]:
    """What one trial holds: its Ray run's resources and its own actor's sliver of a CPU."""
    return [*job_shapes(cfg), {"CPU": TRIAL_CPUS}]


def trials_at_once(sweep: Sweep, free: dict[str, Resources]) -> int:
    """How many trials fit at once in ``free`` (node -> resources), beside SPARE, for every
    combination of the space's extremes (the heaviest bounds it); at most num_samples and
    max_concurrent. A trial that fits nowhere is an error naming its knob values."""
    sc = sweep.config
    cap = min(sc.num_samples, sc.max_concurrent or sc.num_samples)
    at_once, seen = cap, {}
    for knobs, cfg in sweep.extremes:
        shapes = trial_shapes(cfg)
        key = repr(shapes)
        if key not in seen:
            seen[key] = _fits(free, shapes, cap)
        if seen[key] == 0:
            raise ValueError(
                f"a trial with {describe(knobs)} does not fit the cluster: it holds "
                f"{_fmt(total(shapes))} ({cfg.distributed.num_workers} train workers of "
                f"{_fmt(job_shapes(cfg)[0])} with their Ray Data, {cfg.experts.max_actors} "
                f"expert actors, {cfg.experts.num_routers} router(s)) and {_fmt(SPARE)} stays "
                f"free for data tasks; free now: "
                + ("; ".join(f"node {n[:8]} {_fmt({k: r.get(k, 0.0) for k in ('CPU', 'GPU')})}"
                             for n, r in free.items()) or "no node"))
        at_once = min(at_once, seen[key])
    if sc.max_concurrent and at_once < sc.max_concurrent:
        log.info("max_concurrent %d: the cluster holds %d trial%s at once", sc.max_concurrent,
                 at_once, "s" if at_once != 1 else "")
    return at_once


def _fits(free: dict[str, Resources], shapes: list[Resources], cap: int) -> int:
    for k in range(1, cap + 1):
        if fit_count(free, shapes * k, reserve=[SPARE]) < len(shapes) * k:
            return k - 1
    return cap


def _cpus(cfg: Config) -> float:
    return total(trial_shapes(cfg)).get("CPU", 0.0)


def _fmt(resources: Resources) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if v) or "nothing"


def _index_once(cfg: Config, started: bool) -> None:
    """Index the data once, before the trials: each then finds the index cached (next to the
    shards, or in $EXPERTPAR_CACHE_DIR) instead of all of them scanning the same shards."""
    cap = (os.cpu_count() or 1) if started else None  # as train_ray caps an embedded Ray's
    build_index_on_ray(cfg.data.train, max_samples=cfg.data.max_train_samples, max_in_flight=cap)
    if cfg.data.eval:
        build_index_on_ray(cfg.data.eval, max_samples=cfg.data.max_eval_samples,
                           max_in_flight=cap)


def trial_job(base: Config, trials_dir: Path) -> dict:
    """The job tree every trial starts from: the base job, its run under ``trials_dir`` and its
    paths absolute (a Tune trial runs in a directory of its own)."""
    job = config_to_dict(base)
    job["run"]["out_dir"] = str(trials_dir)
    for key in ("train", "eval"):
        if job["data"][key]:
            job["data"][key] = storage.normalize(job["data"][key])
    if job["tokenizer"]["path"]:
        job["tokenizer"]["path"] = storage.normalize(job["tokenizer"]["path"])
    return job


def run_trial(knobs: dict[str, Any], *, job: dict) -> None:
    """One trial, in Tune's actor: the job with the sampled knobs, trained on the Ray path in
    OUT/trials/<trial id>/ (its config.yaml there); every report of its Ray Train run goes to
    Tune through TuneReportCallback."""
    # The trial id names the run: its directory, its Ray Train run and its actors (whose names
    # also carry a random tag), so concurrent trials never share one.
    cfg = trial_config(job, {**{k: _plain(v) for k, v in knobs.items()},
                             "run.name": tune.get_context().get_trial_id()})
    train_ray(cfg, callbacks=[TuneReportCallback()])


def _plain(value: Any) -> Any:
    """A Python value for a sampled one (Tune's integer and float samplers give numpy's)."""
    return value.item() if hasattr(value, "item") else value


def _trial_name(trial) -> str:
    return trial.trial_id


def _domain(dim: SearchDim):
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    lo, hi = dim.values
    if dim.kind == "uniform":
        return tune.uniform(lo, hi)
    if dim.kind == "loguniform":
        return tune.loguniform(lo, hi)
    return tune.randint(lo, hi + 1)  # Tune's leaves hi out; the sweep file's [lo, hi] has it


def _tune(sweep: Sweep, out: Path, at_once: int):
    sc, steps = sweep.config, sweep.base.train.steps
    releaser = Releaser(steps)
    scheduler = (ASHAScheduler(time_attr="step", max_t=steps,
                               grace_period=sc.scheduler.grace_period,
                               reduction_factor=sc.scheduler.reduction_factor,
                               # the last rung is the end of training: nothing left to save
                               stop_last_trials=False)
                 if sc.scheduler.early_stopping else FIFOScheduler())
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job=trial_job(sweep.base, out / "trials")),
        {"cpu": TRIAL_CPUS})
    # A report without the metric (a stop step for a preemption notice or a joining node
    # skips evaluation) is for ASHA to pass over, not for Tune to end the whole sweep on.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    tuner = tune.Tuner(
        trainable,
        param_space={d.key: _domain(d) for d in sc.space},
        tune_config=tune.TuneConfig(
            metric=sc.metric, mode=sc.mode, num_samples=sc.num_samples,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(max_concurrent=at_once, random_state=sc.seed),
            # A fresh actor per trial: a stopped trial's actor goes, with all it owns (a
            # reused one would keep the stopped run going in its thread).
            reuse_actors=False, trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0,
                                  callbacks=[Progress(sc.metric, steps), releaser]))
    try:
        return tuner.fit()
    finally:
        releaser.finish()


class Progress(tune.Callback):
    """A line per report and per trial's end, through the expertpar logger (Tune's own table
    stays off: standard output carries the results)."""

    def __init__(self, metric: str, steps: int):
        self.metric, self.steps = metric, steps

    def on_trial_result(self, iteration, trials, trial, result, **info):
        log.info("trial %s: step %d of %d, %s %s", trial.trial_id, result.get("step", 0),
                 self.steps, self.metric, cell(result.get(self.metric)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step", 0)
        log.info("trial %s: %s at step %d", trial.trial_id,
                 "stopped early (ASHA)" if step < self.steps else "done", step)

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("trial %s failed", trial.trial_id)


class Releaser(tune.Callback):
    """Frees what a trial that ended before its last step left behind (release_trial), in a
    thread each, so Tune's loop goes on; ``finish`` waits for them."""

    def __init__(self, steps: int):
        self.steps = steps
        self.releasing: list[threading.Thread] = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trial.last_result or {}).get("step", 0) < self.steps:  # ASHA stopped it mid-run
            self._release(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial.trial_id)

    def _release(self, trial_id: str) -> None:
        thread = threading.Thread(target=release_trial, args=(trial_id,), daemon=True,
                                  name=f"expertpar-release-{trial_id}")
        thread.start()
        self.releasing.append(thread)

    def finish(self) -> None:
        for thread in self.releasing:
            thread.join()


def release_trial(trial_id: str, timeout_s: float = 60.0) -> list[str]:
    """Free what a trial that ended in the middle of its run left: the expert actors it owned
    die with its Tune actor, but not their placement group, which Ray scopes to the job (a
    group made by an actor that is not detached outlives it). Once none of the trial's actors
    is left (its Tune actor is gone, so it makes no new ones), its groups go. Returns the
    names of the groups removed. Ray Train frees its workers' group itself."""
    prefix = f"expertpar-{trial_id}-"  # actors.py names the actors and the group after the run
    deadline = time.monotonic() + timeout_s
    while (any(a["name"].startswith(prefix) for a in list_named_actors(all_namespaces=True))
           and time.monotonic() < deadline):
        time.sleep(0.5)
    removed = []
    for pg_id, info in placement_group_table().items():
        if info["name"].startswith(prefix) and info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed.append(info["name"])
    if removed:
        log.info("trial %s: freed what its expert actors held (%s)", trial_id,
                 ", ".join(removed))
    # Actors that died abruptly leave their shared-memory buffers behind (an orderly
    # shutdown sweeps them); those of dead processes go now, on this node.
    sweep_dead()
    return removed


def trial_row(result, sweep: Sweep) -> dict:
    """A Tune result as a row of the table: the knobs, the last value of the metric, the steps
    done, the wall seconds to the last report, whether ASHA stopped it, its error."""
    sc, metrics = sweep.config, result.metrics or {}
    steps = int(metrics.get("step") or 0)
    value = metrics.get(sc.metric)
    error = _error_line(result.error) if result.error else ""
    return {"trial": Path(result.path).name,
            **{k: _plain(result.config.get(k)) for k in sweep.knobs},
            sc.metric: float(value) if isinstance(value, (int, float)) else None,
            "steps": steps,
            "seconds": round(float(metrics.get("time_total_s") or math.nan), 1),
            "stopped_early": not error and steps < sweep.base.train.steps,
            "error": error}


def _error_line(err: BaseException) -> str:
    """A trial's error on one line: the last of its text (Tune and Ray wrap the trial's own
    exception, whose ``Type: message`` ends the traceback they carry)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__

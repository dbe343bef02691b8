"""The training loop, one for every backend: read it top to bottom.

schedule -> batch -> step (forward, losses, backward, clip, every owner steps) -> log ->
evaluate -> checkpoint. What differs between running in one process and running on Ray Train
workers with expert actors is a ``Runtime``: where batches come from, who owns which
parameters, how workers talk, and what happens when a checkpoint is written. Every source of
randomness is a function of (seed, step), so a resumed run repeats an uninterrupted one step for
step.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from tokenizers import Tokenizer

from ..config import Config, dump_config
from ..data import Batch, SampleIndex
from ..eval import evaluate
from ..moe import RouteContext
from .checkpoint import restore_rng, write_checkpoint
from .metrics import MetricsLog, eval_line, progress_line
from .names import model_buffers, model_entries
from .optim import lr_at
from .spec import RunSpec
from .owners import Owner, ParameterOwner
from .step import Collective, train_step

log = logging.getLogger("expertpar")


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    final_loss: float
    eval: dict[str, float]
    losses: list[float]  # loss per step of this call's last attempt, for tests and reports
    # each loss the Ray job recovered from, and each move it planned (distributed/recovery.py's
    # Recovery, as a dict)
    recoveries: list[dict] = field(default_factory=list)
    # why this attempt stopped before spec.end, at a checkpoint (distributed/elastic.py)
    stopped: str | None = None


class Runtime(Protocol):
    """What a backend provides to the loop."""
    model: object  # the VisionLanguageModel this process runs (MoE layers local or remote)
    device: object
    owners: list[Owner]  # owners[0] owns this process's parameters; the rest live elsewhere
    comm: Collective

    def batches(self, start: int, end: int) -> Iterator[Batch]:
        """This process's share of every global batch from ``start`` to ``end``, in order."""
        ...

    def eval_data(self) -> SampleIndex | None:
        """The held-out split, on the lead worker (None: no evaluation)."""
        ...

    def report(self, step: int, metrics: dict, checkpoint: Path | None) -> None:
        """Called by every worker at each checkpoint (Ray Train's report is a barrier)."""
        ...

    def stop_requested(self, done: int) -> str | None:
        """Why to stop after step ``done`` (a checkpoint is written there first), or None;
        every worker gets the same answer for the same step."""
        ...


def run(spec: RunSpec, rt: Runtime) -> TrainResult:
    run_dir, lead = Path(spec.run_dir), rt.comm.rank == 0
    tokenizer = Tokenizer.from_str(spec.tokenizer_json)
    if spec.resume_from:
        restore_rng(Path(spec.resume_from))
    metrics_log = (MetricsLog(run_dir / "metrics.jsonl", resume_step=spec.start,
                              tensorboard=spec.cfg.train.tensorboard) if lead else None)
    try:
        return _steps(spec, rt, tokenizer, metrics_log)
    finally:
        if metrics_log is not None:  # the event file; whatever this attempt ends with
            metrics_log.close()


def _steps(spec: RunSpec, rt: Runtime, tokenizer: Tokenizer,
           metrics_log: MetricsLog | None) -> TrainResult:
    """The steps of ``run``, logging to ``metrics_log`` on the lead worker (None elsewhere)."""
    cfg, tc, seed = spec.cfg, spec.cfg.train, spec.cfg.run.seed
    run_dir, lead = Path(spec.run_dir), rt.comm.rank == 0
    if lead:
        metrics_log.write({"step": spec.start, "event": "start", **spec.skipped,
                           "data/train_samples": spec.train_samples, "train/workers": rt.comm.world,
                           **(spec.text_init.metrics() if spec.text_init else {})})
    eval_data = rt.eval_data() if lead and spec.eval_location else None
    model, device = rt.model, rt.device

    losses, eval_metrics, loss = [], {}, float("nan")
    eval_step = None  # the step eval_metrics are of
    # Non-finite steps: skipped ones in a row (and the first of them), and in all.
    bad, first_bad, skipped = 0, None, 0
    last_checkpoint = spec.resume_from
    t_begin, tokens_seen = time.perf_counter(), 0
    t0 = time.perf_counter()
    for batch in rt.batches(spec.start, spec.end):
        step, batch = batch.step, batch.to(device)
        lr = lr_at(step, tc)
        t_data = time.perf_counter() - t0

        model.train()
        out = train_step(model, batch, RouteContext(seed=seed, step=step), rt.owners, rt.comm,
                         tc.grad_clip, lr)
        loss = out.metrics["loss/total"]
        losses.append(loss)
        dt = time.perf_counter() - t0
        tokens = (batch.images_BCHW.shape[0] * model.image_stem.num_tokens
                  + int(batch.mask_BL.sum())) * rt.comm.world
        tokens_seen += tokens

        done = step + 1
        metrics = out.metrics
        if out.skipped:
            bad, skipped = bad + 1, skipped + 1
            first_bad = done if bad == 1 else first_bad
            log.warning("step %d: the loss or a gradient is NaN or inf (loss %s, gradient norm "
                        "%s): skipped, no parameter or optimizer state changed (%d in a row)",
                        done, loss, metrics["optim/grad_norm"], bad)
            if bad >= tc.max_skipped_in_a_row:
                raise NonFiniteSteps(
                    f"steps {first_bad}..{done}: {bad} in a row had a NaN or inf loss or "
                    f"gradient (train.max_skipped_in_a_row={tc.max_skipped_in_a_row}); every "
                    f"one was skipped. The checkpoint from before the first of them is "
                    f"{last_checkpoint or 'none (the run had not written one)'}; lower "
                    f"train.lr or raise train.grad_clip, or look at the data of those steps")
        else:
            bad = 0
        metrics["optim/skipped_total"] = skipped
        # A preemption notice, or a node with room for more expert actors (Ray): the job
        # moves at this step, from the checkpoint written below.
        stop = rt.stop_requested(done) if done < spec.end else None
        if lead and done == spec.start + 1:
            # When the run (or a resumed one) got going: a recovery's time is measured to it.
            metrics_log.write({"step": done, "event": "first_step", "time/unix": time.time()})
        if done % tc.log_every == 0 or done == spec.end:
            for L, s in sorted(out.stats.items()):
                metrics.update(s.summary(f"moe{L}"))
            metrics.update({"step": done, "optim/lr": lr, "time/data_s": t_data,
                            "time/step_s": dt, "throughput/tokens_per_s": tokens / dt})
            if lead:
                metrics_log.write(metrics)
                elapsed = time.perf_counter() - t_begin
                log.info(progress_line(done, tc.steps, loss, tokens_seen / elapsed,
                                       elapsed / (done - spec.start) * (spec.end - done)))
        if spec.eval_location and not stop and ((tc.eval_every and done % tc.eval_every == 0)
                                                or done == tc.steps):
            if lead:
                eval_metrics = evaluate(model, eval_data, tokenizer, cfg, info=spec.info,
                                        device=device)
                eval_step = done
                metrics_log.write({"step": done, **eval_metrics})
                (run_dir / "eval.json").write_text(json.dumps({"step": done, **eval_metrics},
                                                              indent=1))
                log.info(eval_line(done, eval_metrics))
            rt.comm.barrier()  # the others wait here, not in the router's rendezvous
        last = done in (spec.end, tc.steps) or bool(stop)
        if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or last:
            # Not in a run of skipped steps (but the last): the checkpoint from before it
            # must stay (pruning would take it), and a skipped step changed nothing.
            keep = not bad or last
            path = save(spec, done, rt.owners) if lead and keep else None
            last_checkpoint = path or last_checkpoint
            # This step's evaluation rides along (flat numbers), so a report can be judged
            # by it: a sweep's metric is zero_shot/top1 by default (app/sweep.py). Never an
            # older one (a stop step skips evaluation): a trial is not judged on a stale value.
            report = {"step": done, "loss/total": loss, **metrics,
                      **(eval_metrics if eval_step == done else {})}
            if done == spec.end or stop:
                report.update({"losses": losses, "eval": eval_metrics, "stopped": stop})
            rt.report(done, report, path)
        if stop:
            log.info("step %d: stopped (%s), at this step's checkpoint", done, stop)
            return TrainResult(run_dir, done, loss, eval_metrics, losses, stopped=stop)
        t0 = time.perf_counter()
    if len(losses) != spec.end - spec.start:
        raise RuntimeError(f"the data stream ended after {len(losses)} of the steps "
                           f"{spec.start}..{spec.end - 1}; the last checkpoint is the run's state")
    return TrainResult(run_dir, spec.end, loss, eval_metrics, losses)


class NonFiniteSteps(RuntimeError):
    """Too many steps in a row had a NaN or inf loss or gradient (train.max_skipped_in_a_row)."""


def nothing_to_do(spec: RunSpec) -> TrainResult:
    """A resumed run whose checkpoint is already at its last step."""
    log.info("nothing to train: the checkpoint %s is at step %d of %d (raise train.steps to go "
             "on, or start over with --no-resume)", spec.resume_from, spec.start,
             spec.cfg.train.steps)
    return TrainResult(Path(spec.run_dir), spec.start, float("nan"), {}, [])


def save(spec: RunSpec, step: int, owners: list[Owner]) -> Path:
    """Every owner's part, one checkpoint: written by the lead worker alone."""
    shards = {}
    for owner in owners:
        shards.update(owner.export())
    return write_checkpoint(
        Path(spec.run_dir) / "checkpoints", step, shards,
        train_state={"skipped": spec.skipped},
        text_files={"config.yaml": dump_config(spec.cfg), "tokenizer.json": spec.tokenizer_json},
        keep=spec.cfg.train.keep_checkpoints)


def dense_owner(model, cfg: Config) -> ParameterOwner:
    """The owner of every parameter this process's model holds (all of them in process)."""
    return ParameterOwner(model_entries(model), cfg.train, model_buffers(model))

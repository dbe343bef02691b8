"""The Ray path end to end: the driver sets up actors and data, Ray Train runs the workers.

Driver: attach to (or start) Ray -> read both splits with Ray Data -> tokenizer -> start the
expert actors and the router (from the latest checkpoint, whatever topology wrote it) -> a
TorchTrainer whose workers run ``train_worker`` -> stop every actor, even on failure.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import ray
import torch.distributed as dist
from tokenizers import Tokenizer

from ..config import Config, config_from_dict, config_to_dict, dump_config
from ..eval import evaluate
from ..moe import RouteContext
from ..train.checkpoint import (gather_tensors, latest_checkpoint, read_shards,
                                read_train_state, restore_model, write_checkpoint)
from ..train.loop import TrainResult, eval_line
from ..train.metrics import MetricsLog, progress_line
from ..train.optim import build_optimizer, lr_at, set_lr
from ..train.setup import (build_model, load_tokenizer_for, pick_device, seed_everything,
                           set_aside_previous_run)
from .actors import ray_init, start_moe_actors
from .bridge import RayBackend
from .data import load_split, worker_stream
from .step import distributed_train_step


def train_ray(cfg: Config, *, resume: bool = True, stop_after: int | None = None,
              echo: Callable[[str], None] = print) -> TrainResult:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        set_aside_previous_run(run_dir)
    seed_everything(cfg.run.seed)
    t_setup = time.perf_counter()
    started = ray_init(cfg)
    moe = None
    try:
        train_ds = load_split(cfg.data.train, max_samples=cfg.data.max_train_samples)
        if len(train_ds) < cfg.train.batch_size:
            raise ValueError(f"data.train '{cfg.data.train}' has {len(train_ds)} usable samples,"
                             f" fewer than train.batch_size ({cfg.train.batch_size})")
        eval_ds = (load_split(cfg.data.eval, max_samples=cfg.data.max_eval_samples)
                   if cfg.data.eval else None)
        tokenizer = load_tokenizer_for(cfg, run_dir, train_ds.captions)
        ckpt = latest_checkpoint(run_dir / "checkpoints") if resume else None
        shards = read_shards(ckpt) if ckpt is not None else {}
        start = read_train_state(ckpt)["step"] if ckpt is not None else 0
        if ckpt is not None:
            echo(f"resumed from {ckpt} at step {start}")
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        moe = start_moe_actors(cfg, shards)
        (run_dir / "ray_topology.json").write_text(json.dumps(
            {"expert_actors": moe.infos, "num_workers": cfg.distributed.num_workers},
            indent=1, default=str))
        end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
        echo(f"ray: data and {len(moe.actors)} expert actors ready in {time.perf_counter() - t_setup:.1f}s")
        loop_config = {
            "cfg": config_to_dict(cfg), "run_dir": str(run_dir), "router": moe.router,
            "train_ref": ray.put(train_ds.samples), "n_train": len(train_ds),
            "skipped": train_ds.skipped.as_metrics(),
            "eval_ref": ray.put(eval_ds) if eval_ds is not None else None,
            "info": train_ds.info if eval_ds is None else (eval_ds.info or train_ds.info),
            "tokenizer_json": tokenizer.to_str(), "start": start, "end": end,
            "dense_ref": ray.put(shards.get("dense.safetensors", {})),
        }
        trainer = TorchTrainer(
            train_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=cfg.distributed.num_workers, use_gpu=cfg.distributed.use_gpu,
                resources_per_worker={"CPU": cfg.distributed.cpus_per_worker}),
            run_config=RunConfig(name=cfg.run.name, storage_path=str(run_dir / "ray_train"),
                                 checkpoint_config=CheckpointConfig(
                                     num_to_keep=cfg.train.keep_checkpoints)))
        t_fit = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as err:
            last = latest_checkpoint(run_dir / "checkpoints")
            raise RuntimeError(
                f"training failed: {moe.failure_summary()}. The last good checkpoint is "
                f"{last or 'none'}; run the same command again to resume from it.") from err
        echo(f"ray: training job finished in {time.perf_counter() - t_fit:.1f}s")
        final = result.metrics or {}
        return TrainResult(run_dir, end, final.get("loss/total", float("nan")),
                           final.get("eval", {}), final.get("losses", []))
    finally:
        if moe is not None:
            moe.shutdown()
        if started:
            ray.shutdown()


def train_worker(config: dict) -> None:
    """One Ray Train worker: the dense model, data-parallel; MoE layers through the router."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from_dict(config["cfg"])
    tc, seed = cfg.train, cfg.run.seed
    run_dir = Path(config["run_dir"])
    router = config["router"]
    tokenizer = Tokenizer.from_str(config["tokenizer_json"])
    device = pick_device(tc.device)
    model = build_model(cfg, tokenizer.get_vocab_size(), RayBackend(router, rank=rank,
                                                                    world_size=world)).to(device)
    optimizer = build_optimizer(model.named_parameters(), tc)
    dense = ray.get(config["dense_ref"])
    if dense:
        restore_model(model, {"dense.safetensors": dense}, optimizer, where="dense state")
    start, end = config["start"], config["end"]
    lead = rank == 0
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start) if lead else None
    if lead:
        metrics_log.write({"step": start, "event": "start", **config["skipped"],
                           "data/train_samples": config["n_train"], "ray/workers": world})
    eval_ds = ray.get(config["eval_ref"]) if (lead and config["eval_ref"] is not None) else None

    losses, eval_metrics, loss = [], {}, float("nan")
    t_begin, tokens_seen = time.perf_counter(), 0
    stream = worker_stream(config["train_ref"], config["n_train"], cfg, config["tokenizer_json"],
                           start=start, end=end, rank=rank, world=world)
    t0 = time.perf_counter()
    for step, images, ids, mask in stream:
        lr = lr_at(step, tc)
        set_lr(optimizer, lr)
        t_data = time.perf_counter() - t0
        model.train()
        metrics, stats = distributed_train_step(
            model, optimizer, router, images.to(device), ids.to(device), mask.to(device),
            RouteContext(seed=seed, step=step), tc.grad_clip, lr)
        loss = metrics["loss/total"]
        losses.append(loss)
        dt = time.perf_counter() - t0
        tokens = (images.shape[0] * model.image_stem.num_tokens + int(mask.sum())) * world
        tokens_seen += tokens

        done = step + 1
        if done % tc.log_every == 0 or done == end:
            for L, s in sorted(stats.items()):
                metrics.update(s.summary(f"moe{L}"))
            metrics.update({"step": done, "optim/lr": lr, "time/data_s": t_data,
                            "time/step_s": dt, "throughput/tokens_per_s": tokens / dt})
            if lead:
                metrics_log.write(metrics)
                elapsed = time.perf_counter() - t_begin
                echo_line(progress_line(done, tc.steps, loss, tokens_seen / elapsed,
                                        elapsed / (done - start) * (end - done)))
        eval_due = config["eval_ref"] is not None and (
            (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps)
        if eval_due and lead:
            eval_metrics = evaluate(model, eval_ds, tokenizer, cfg, info=config["info"],
                                    device=device)
            metrics_log.write({"step": done, **eval_metrics})
            (run_dir / "eval.json").write_text(json.dumps({"step": done, **eval_metrics},
                                                          indent=1))
            echo_line(eval_line(done, eval_metrics))
        if eval_due and world > 1:
            # The others wait here (not in the router's rendezvous, which has a deadline).
            dist.barrier()
        # ray.train.report is a barrier of all workers (about a second here), so it goes with
        # checkpoints only; every step's metrics are in metrics.jsonl already.
        if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done in (end, tc.steps):
            checkpoint = None
            if lead:
                shards = gather_tensors(model, optimizer)
                shards.update(ray.get(router.state.remote()))
                path = write_checkpoint(
                    run_dir / "checkpoints", done, shards,
                    train_state={"skipped": config["skipped"]},
                    text_files={"config.yaml": dump_config(cfg),
                                "tokenizer.json": config["tokenizer_json"]},
                    keep=tc.keep_checkpoints)
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            report = {"step": done, "loss/total": loss, **metrics}
            if done == end:
                report.update({"losses": losses, "eval": eval_metrics})
            ray.train.report(report, checkpoint=checkpoint)
        t0 = time.perf_counter()


def echo_line(line: str) -> None:
    # Ray Train tees a worker's sys.stdout into its own log, which reaches the driver too;
    # the process's real stdout reaches it once.
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()

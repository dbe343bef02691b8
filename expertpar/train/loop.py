"""The in-process training loop: read it top to bottom.

schedule -> batch -> forward -> CLIP + auxiliary losses -> backward -> clip -> step -> log ->
evaluate -> checkpoint. Every source of randomness is a function of (seed, step), so a resumed
run repeats an uninterrupted one step for step.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Config, dump_config
from ..data import batch_indices, combine_seed, encode_captions, make_transform
from ..eval import evaluate
from ..moe import MoEBackend, RouteContext
from .checkpoint import (gather_tensors, latest_checkpoint, read_shards, read_train_state,
                         restore_model, restore_rng, write_checkpoint)
from .loss import MAX_LOGIT_SCALE, clip_loss
from .metrics import MetricsLog, progress_line
from .optim import build_optimizer, lr_at, set_lr
from .setup import (load_run_data, model_for_tokenizer, pick_device, seed_everything,
                    set_aside_previous_run)

log = logging.getLogger("expertpar")


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    final_loss: float
    eval: dict[str, float]
    losses: list[float]  # loss per step run in this call, for tests and reports


def train_step(model, optimizer, images, ids, mask, ctx: RouteContext, grad_clip: float):
    """One optimisation step; returns (metrics, routing stats)."""
    enc = model.encode(images, ids, mask, ctx)
    loss_clip = clip_loss(enc.image_BE, enc.text_BE, model.logit_scale)
    loss = loss_clip + enc.aux_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0
                 else torch.linalg.vector_norm(torch.stack(
                     [p.grad.norm() for p in params if p.grad is not None])))
    optimizer.step()
    with torch.no_grad():  # CLIP: the learned temperature may not sharpen past 1/100
        model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
    metrics = {"loss/total": loss.item(), "loss/clip": loss_clip.item(),
               "loss/aux": enc.aux_loss.item(), "optim/grad_norm": grad_norm.item(),
               "model/logit_scale": model.logit_scale.exp().item()}
    metrics.update({f"aux/{k}": float(v) for k, v in enc.aux.items()})
    return metrics, enc.stats


def train(cfg: Config, *, backend: MoEBackend | None = None, resume: bool = True,
          stop_after: int | None = None, echo: Callable[[str], None] = print) -> TrainResult:
    """Train as ``cfg`` says; ``stop_after`` ends early after that many steps (tests, faults)."""
    if cfg.distributed.backend == "ray" and backend is None:
        from ..distributed.job import train_ray
        return train_ray(cfg, resume=resume, stop_after=stop_after, echo=echo)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        set_aside_previous_run(run_dir)
    seed, tc = cfg.run.seed, cfg.train
    seed_everything(seed)
    device = pick_device(tc.device)
    data = load_run_data(cfg, run_dir)
    model = model_for_tokenizer(cfg, data.tokenizer, backend).to(device)
    optimizer = build_optimizer(model.named_parameters(), tc)

    start = 0
    ckpt = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if ckpt is not None:
        restore_model(model, read_shards(ckpt), optimizer, where=str(ckpt))
        restore_rng(ckpt)
        start = read_train_state(ckpt)["step"]
        echo(f"resumed from {ckpt} at step {start}")
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start)
    metrics_log.write({"step": start, "event": "start", **data.train.skipped.as_metrics(),
                       "data/train_samples": len(data.train)})
    transform = make_transform(cfg.data.image_size, train=True, hflip=cfg.data.hflip)

    losses, eval_metrics, loss = [], {}, float("nan")
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    t_begin, tokens_seen = time.perf_counter(), 0
    for step in range(start, end):
        lr = lr_at(step, tc)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        idx = batch_indices(len(data.train), tc.batch_size, seed=seed, step=step)
        images, captions, _ = data.train.batch(idx, transform, seed=combine_seed(seed, step))
        ids, mask = encode_captions(data.tokenizer, captions, cfg.tokenizer.context_length)
        images, ids, mask = images.to(device), ids.to(device), mask.to(device)
        t_data = time.perf_counter() - t0

        model.train()
        metrics, stats = train_step(model, optimizer, images, ids, mask,
                                    RouteContext(seed=seed, step=step), tc.grad_clip)
        loss = metrics["loss/total"]
        losses.append(loss)
        dt = time.perf_counter() - t0
        tokens = images.shape[0] * model.image_stem.num_tokens + int(mask.sum())
        tokens_seen += tokens

        done = step + 1
        if done % tc.log_every == 0 or done == end:
            for L, s in sorted(stats.items()):
                metrics.update(s.summary(f"moe{L}"))
            elapsed = time.perf_counter() - t_begin
            metrics.update({"step": done, "optim/lr": lr, "time/data_s": t_data,
                            "time/step_s": dt, "throughput/tokens_per_s": tokens / dt})
            metrics_log.write(metrics)
            eta = elapsed / (done - start) * (end - done)
            echo(progress_line(done, tc.steps, loss, tokens_seen / elapsed, eta))
        if data.eval is not None and ((tc.eval_every and done % tc.eval_every == 0)
                                      or done == tc.steps):
            eval_metrics = evaluate(model, data.eval, data.tokenizer, cfg, info=data.info,
                                    device=device)
            metrics_log.write({"step": done, **eval_metrics})
            (run_dir / "eval.json").write_text(json.dumps({"step": done, **eval_metrics}, indent=1))
            echo(eval_line(done, eval_metrics))
        if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done in (end, tc.steps):
            save(run_dir, done, model, optimizer, cfg, data)
    return TrainResult(run_dir, end, loss, eval_metrics, losses)


def save(run_dir: Path, step: int, model, optimizer, cfg: Config, data) -> Path:
    return write_checkpoint(
        run_dir / "checkpoints", step, gather_tensors(model, optimizer),
        train_state={"skipped": data.train.skipped.as_metrics()},
        text_files={"config.yaml": dump_config(cfg),
                    "tokenizer.json": (run_dir / "tokenizer.json").read_text()},
        keep=cfg.train.keep_checkpoints)


def eval_line(step: int, m: dict[str, float]) -> str:
    parts = [f"eval @ {step}:"]
    for key in ("zero_shot/top1", "zero_shot/top5", "retrieval/image_to_text/R@1",
                "retrieval/text_to_image/R@1", "retrieval/image_to_text/R@5"):
        if key in m:
            parts.append(f"{key}={m[key]:.3f}")
    return " ".join(parts)

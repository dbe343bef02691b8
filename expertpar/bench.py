"""``expertpar bench``: step time of the Ray path against the in-process path, side by side.

Both paths train the same model on the same batches in this one run (this machine is noisy, so
only ratios measured together mean anything). The Ray path is timed in its steady state, with
one train worker driving the router and expert actors from this process; Ray Train's start-up
is measured separately, as the wall time of a short job.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from .config import Config, config_to_dict
from .data import ImageTextDataset, batch_indices, combine_seed, encode_captions, make_transform
from .moe import RouteContext
from .train.loop import train_step
from .train.optim import build_optimizer
from .train.setup import build_model, load_tokenizer_for


def _batches(cfg: Config, ds: ImageTextDataset, tokenizer, steps: int) -> list[tuple]:
    transform = make_transform(cfg.data.image_size, train=True)
    out = []
    for step in range(steps):
        idx = batch_indices(len(ds), cfg.train.batch_size, seed=cfg.run.seed, step=step)
        images, captions, _ = ds.batch(idx, transform, seed=combine_seed(cfg.run.seed, step))
        ids, mask = encode_captions(tokenizer, captions, cfg.tokenizer.context_length)
        out.append((images, ids, mask))
    return out


def _median_step(run_step, batches, warmup: int) -> tuple[float, list[float]]:
    times = []
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        run_step(step, batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:]), times


def run_bench(cfg: Config, out_dir: Path, *, steps: int = 30, warmup: int = 5) -> dict:
    import ray

    from .distributed.actors import ray_init, start_moe_actors
    from .distributed.bridge import RayBackend
    from .distributed.step import distributed_train_step
    from .train.optim import lr_at

    out_dir.mkdir(parents=True, exist_ok=True)
    ds = ImageTextDataset.load(cfg.data.train)
    tokenizer = load_tokenizer_for(cfg, out_dir, ds.captions)
    vocab = tokenizer.get_vocab_size()
    batches = _batches(cfg, ds, tokenizer, steps)

    local = build_model(cfg, vocab)
    opt = build_optimizer(local.named_parameters(), cfg.train)
    local_s, _ = _median_step(
        lambda s, b: train_step(local, opt, *b, RouteContext(cfg.run.seed, s), cfg.train.grad_clip),
        batches, warmup)

    started = ray_init(cfg)
    moe = start_moe_actors(cfg)
    try:
        remote = build_model(cfg, vocab, RayBackend(moe.router))
        opt_r = build_optimizer(remote.named_parameters(), cfg.train)
        ray.get(moe.router.call_counts.remote(reset=True))
        ray_s, _ = _median_step(
            lambda s, b: distributed_train_step(remote, opt_r, moe.router, *b,
                                                RouteContext(cfg.run.seed, s),
                                                cfg.train.grad_clip, lr_at(s, cfg.train)),
            batches, warmup)
        calls = ray.get(moe.router.call_counts.remote())
    finally:
        moe.shutdown()
        if started:
            ray.shutdown()
    per_step = {k: v / steps for k, v in sorted(calls.items())}
    tokens = batches[0][0].shape[0] * local.image_stem.num_tokens + int(batches[0][2].sum())
    result = {
        "model": {"dim": cfg.model.dim, "depth": cfg.model.depth,
                  "experts": cfg.model.moe.num_experts, "top_k": cfg.model.moe.top_k,
                  "moe_layers": cfg.num_moe_layers, "batch_size": cfg.train.batch_size,
                  "tokens_per_step": tokens},
        "expert_actors": cfg.experts.num_actors,
        "steps_timed": steps - warmup,
        "in_process_step_s": local_s,
        "ray_step_s": ray_s,
        "ray_over_in_process": ray_s / local_s,
        "ray_calls_per_step": per_step,
        "ray_calls_per_step_total": sum(per_step.values()),
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "config": config_to_dict(cfg),
    }
    (out_dir / "step_time.json").write_text(json.dumps(result, indent=1))
    return result

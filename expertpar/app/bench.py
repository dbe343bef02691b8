"""``expertpar bench``: step time of the Ray path against the in-process path, side by side.

Both paths run the same training step (train/step.py) on the same batches in this one run (this
machine is noisy, so only ratios measured together mean anything). The Ray path is timed in its
steady state, with one train worker's runtime — model with remote MoE layers, dense owner, the
router as the remote owner — driven from this process.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ..config import Config, config_to_dict
from ..data import SampleIndex, train_batches
from ..moe import RouteContext
from ..train.loop import dense_owner
from ..train.setup import build_model, load_tokenizer_for
from ..train.step import SingleProcess, train_step


def _median_step(model, owners, batches, cfg: Config, warmup: int) -> float:
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        train_step(model, batch, RouteContext(cfg.run.seed, batch.step), owners,
                   SingleProcess(), cfg.train.grad_clip, cfg.train.lr)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def _pipeline_samples_per_s(location: str, cfg: Config, tokenizer_json: str, steps: int) -> float:
    """Samples per second the Ray Data pipeline of one worker delivers on its own (the first
    batch, which pays for starting the pipeline, is not counted)."""
    from ..distributed.data import dataset_name, iter_worker_batches, train_datasets

    ds = train_datasets(location, cfg, tokenizer_json, start=0, end=steps)[dataset_name(0)]
    t0, n = None, 0
    for batch in iter_worker_batches(ds.iterator(), cfg, world=1):
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += batch.images_BCHW.shape[0]
    return n / (time.perf_counter() - t0)


def run_bench(cfg: Config, out_dir: Path, *, steps: int = 30, warmup: int = 5) -> dict:
    import ray

    from ..distributed.actors import start_moe_actors
    from ..distributed.bridge import RayBackend
    from ..distributed.runtime import RemoteOwner
    from .ray_job import ray_init

    out_dir.mkdir(parents=True, exist_ok=True)
    index = SampleIndex.build(cfg.data.train, max_samples=cfg.data.max_train_samples)
    tokenizer = load_tokenizer_for(cfg, out_dir, index.captions)
    vocab = tokenizer.get_vocab_size()
    batches = list(train_batches(index, cfg, tokenizer, start=0, end=steps))

    local = build_model(cfg, vocab)
    local_s = _median_step(local, [dense_owner(local, cfg)], batches, cfg, warmup)

    started, moe = ray_init(cfg), None
    try:
        moe = start_moe_actors(cfg)
        remote = build_model(cfg, vocab, RayBackend(moe.router))
        owners = [dense_owner(remote, cfg), RemoteOwner(moe.router, lead=True)]
        ray.get(moe.router.call_counts.remote(reset=True))
        ray_s = _median_step(remote, owners, batches, cfg, warmup)
        calls = ray.get(moe.router.call_counts.remote())
        one_worker = dataclasses.replace(cfg, distributed=dataclasses.replace(
            cfg.distributed, num_workers=1))
        delivered = _pipeline_samples_per_s(index.location, one_worker, tokenizer.to_str(),
                                            steps)
    finally:
        if moe is not None:
            moe.shutdown()
        if started:
            ray.shutdown()
    per_step = {k: v / steps for k, v in sorted(calls.items())}
    first = batches[0]
    tokens = first.images_BCHW.shape[0] * local.image_stem.num_tokens + int(first.mask_BL.sum())
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
        # One worker's Ray Data pipeline alone, against what one Ray-path training step eats.
        "data_pipeline": {"delivered_samples_per_s": delivered,
                          "consumed_samples_per_s": cfg.train.batch_size / ray_s,
                          "headroom": delivered * ray_s / cfg.train.batch_size},
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "config": config_to_dict(cfg),
    }
    (out_dir / "step_time.json").write_text(json.dumps(result, indent=1))
    return result

"""``expertpar bench``: the Ray path against the in-process path, side by side, in one run.

This machine is noisy, so only ratios measured together mean anything. One run measures:

1. the reference MoE layer (d 512, expert hidden 2048, 8 experts, top-2, capacity 1.25, 8192
   tokens; forward, backward, clipped AdamW step) with its experts on 2 and on 4 actors, and
   on 2 actors through Ray's object store instead of shared memory (``experts.shared_memory``);
2. the job's model (``make bench``: the quickstart), a whole training step (train/step.py);
3. Ray calls per step: the worker's calls in a row, against the 2L + 1 target;
4. transport: bytes the MoE layer moves per step over the seconds spent moving them, against
   a memcpy of as many bytes in this run;
5. one forward of 64 tokens through the reference layer, both paths;
6. growth of the step time with tokens per step, experts (fixed top-k) and expert actors;
7. the Ray Data pipeline of one worker against what training consumes.

It writes ``results.json``, ``results.md`` (the table README quotes) and ``growth.png``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, config_to_dict
from ..data import SampleIndex, train_batches
from ..moe import RouteContext
from ..train.loop import dense_owner
from ..train.setup import build_model, load_tokenizer_for
from ..train.step import SingleProcess, train_step
from . import bench_moe
from .bench_moe import LayerSpec
from .plot import line_panels

log = logging.getLogger("expertpar")

TARGETS = {"reference_ratio": 1.10, "quickstart_ratio": 1.30,
           "transport_fraction_of_memcpy": 0.5, "small_batch_forward_ms": 2.0}


@dataclass(frozen=True)
class BenchPlan:
    """What to measure; the defaults are the full bench (under 12 minutes on 2 cores)."""
    reference: LayerSpec = LayerSpec()
    layer_steps: int = 3
    layer_warmup: int = 1
    # Growth runs a quarter-size layer (d 256, hidden 1024): still expert-bound, 4x faster.
    growth: LayerSpec = LayerSpec(dim=256, hidden=1024)
    growth_tokens: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
    growth_experts: tuple[int, ...] = (4, 8, 16, 32)
    growth_actors: tuple[int, ...] = (1, 2, 4)
    model_steps: int = 30
    model_warmup: int = 5
    means_repeats: int = 5


def _median_step(model, owners, batches, cfg: Config, warmup: int) -> float:
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        train_step(model, batch, RouteContext(cfg.run.seed, batch.step), owners,
                   SingleProcess(), cfg.train.grad_clip, cfg.train.lr)
        times.append(time.perf_counter() - t0)
    for owner in owners:
        getattr(owner, "settle", lambda: None)()
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


def model_step(cfg: Config, out_dir: Path, steps: int, warmup: int,
               pipeline: bool = True) -> dict:
    """The job's model: a whole training step in process and through the Ray path, and (with
    ``pipeline``) what one worker's Ray Data pipeline delivers against what the step takes."""
    import ray

    from ..distributed.actors import start_moe_actors
    from ..distributed.bridge import RayBackend
    from ..distributed.runtime import RemoteOwner

    index = SampleIndex.build(cfg.data.train, max_samples=cfg.data.max_train_samples)
    tokenizer = load_tokenizer_for(cfg, out_dir, index.captions)
    vocab = tokenizer.get_vocab_size()
    batches = list(train_batches(index, cfg, tokenizer, start=0, end=steps))
    local = build_model(cfg, vocab)
    local_s = _median_step(local, [dense_owner(local, cfg)], batches, cfg, warmup)
    moe = start_moe_actors(cfg)
    try:
        backend = RayBackend(moe.router)
        remote = build_model(cfg, vocab, backend)
        owners = [dense_owner(remote, cfg), RemoteOwner(backend, lead=True)]
        _median_step(remote, owners, batches[:warmup], cfg, 0)
        ray.get(moe.router.call_counts.remote(reset=True))
        backend.calls_made.clear()
        ray_s = _median_step(remote, owners, batches[warmup:], cfg, 0)
        calls = Counter(ray.get(moe.router.call_counts.remote())) + backend.calls_made
    finally:
        moe.shutdown()
    timed = steps - warmup
    per_step = {k: v / timed for k, v in sorted(calls.items())}
    first = batches[0]
    tokens = first.images_BCHW.shape[0] * local.image_stem.num_tokens + int(first.mask_BL.sum())
    L = cfg.num_moe_layers
    out = {
        "model": {"dim": cfg.model.dim, "depth": cfg.model.depth,
                  "experts": cfg.model.moe.num_experts, "top_k": cfg.model.moe.top_k,
                  "moe_layers": L, "batch_size": cfg.train.batch_size,
                  "tokens_per_step": tokens, "expert_actors": cfg.experts.num_actors},
        "steps_timed": timed, "in_process_step_s": local_s, "ray_step_s": ray_s,
        "ratio": ray_s / local_s, "calls_per_step": per_step,
        # The worker's own calls, one after another: forward and backward per MoE layer,
        # and the optimizer step (not waited for). The router's fan-outs run inside them;
        # with experts.transport direct the worker's own fan-outs count one each.
        "serial_calls_per_step": sum(v for k, v in per_step.items()
                                     if k.startswith(("worker->router/", "worker->experts/"))),
        "transport": cfg.experts.transport,
        "serial_calls_target": 2 * L + 1,
        "calls_per_step_total": sum(v for k, v in per_step.items()
                                    if not k.startswith("worker->experts/")),
    }
    if pipeline:
        one_worker = dataclasses.replace(cfg, distributed=dataclasses.replace(
            cfg.distributed, num_workers=1))
        delivered = _pipeline_samples_per_s(index.location, one_worker, tokenizer.to_str(),
                                            steps)
        out["data_pipeline"] = {"delivered_samples_per_s": delivered,
                                "consumed_samples_per_s": cfg.train.batch_size / ray_s,
                                "headroom": delivered * ray_s / cfg.train.batch_size}
    return out


class _Layers:
    """Layer workloads timed in one run: each is timed once, however many series it is in."""

    def __init__(self, plan: BenchPlan):
        self.plan = plan
        self.done: dict = {}  # (path, spec, experts settings) -> result

    def _measure(self, path: str, spec: LayerSpec, experts: dict) -> dict:
        p = self.plan
        # The in-process path has no actors: one timing serves every actor count.
        key = (path, spec, tuple(sorted(experts.items()))) if path == "ray" else (
            path, dataclasses.replace(spec, actors=0))
        if key not in self.done:
            self.done[key] = (bench_moe.in_process(spec, p.layer_steps, p.layer_warmup)
                              if path == "in_process" else
                              bench_moe.on_ray(spec, p.layer_steps, p.layer_warmup, **experts))
        return self.done[key]

    def pair(self, spec: LayerSpec, **experts) -> dict:
        """In process and on Ray, side by side; ``experts``: experts settings for the Ray
        path (e.g. shared_memory=False, calls="ray")."""
        local = self._measure("in_process", spec, {})
        ray_ = self._measure("ray", spec, experts)
        a, b = local["timing"], ray_["timing"]
        return {"layer": dataclasses.asdict(spec), "experts": experts,
                "in_process_step_s": a.median_s, "ray_step_s": b.median_s,
                "ratio": b.median_s / a.median_s,
                "in_process_spread_s": [a.min_s, a.max_s], "ray_spread_s": [b.min_s, b.max_s],
                "calls_per_step": ray_["calls_per_step"], "transport": ray_["transport"],
                "small_batch_forward_ms": {"in_process": local["small_batch_forward_ms"],
                                           "ray": ray_["small_batch_forward_ms"]}}


def _growth(plan: BenchPlan, layers: _Layers) -> dict:
    g = plan.growth
    series = {"tokens": [dataclasses.replace(g, tokens=t) for t in plan.growth_tokens],
              "experts": [dataclasses.replace(g, experts=e, actors=min(g.actors, e))
                          for e in plan.growth_experts],
              "actors": [dataclasses.replace(g, actors=a) for a in plan.growth_actors]}
    out = {}
    for name, specs in series.items():
        rows = []
        for spec in specs:
            pair = layers.pair(spec)
            rows.append({"tokens": spec.tokens, "experts": spec.experts, "actors": spec.actors,
                         "in_process_step_s": pair["in_process_step_s"],
                         "ray_step_s": pair["ray_step_s"], "ratio": pair["ratio"]})
            log.info("growth %-7s tokens %6d experts %3d actors %d: in process %.3f s, Ray "
                     "%.3f s (%.2fx)", name, spec.tokens, spec.experts, spec.actors,
                     pair["in_process_step_s"], pair["ray_step_s"], pair["ratio"])
        out[name] = rows
    return out


def run_bench(cfg: Config, out_dir: Path, plan: BenchPlan = BenchPlan()) -> dict:
    import ray

    from .ray_job import ray_init

    out_dir.mkdir(parents=True, exist_ok=True)
    # Both paths get this machine's cores: the in-process step, the worker's dense part, the
    # router and (shared) the expert actors set their torch threads from it.
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    started = ray_init(dataclasses.replace(cfg, experts=dataclasses.replace(
        cfg.experts, num_actors=max(cfg.experts.num_actors, *plan.growth_actors,
                                    plan.reference.actors, 4))))
    t_start = time.perf_counter()
    layers = _Layers(plan)
    try:
        reference = layers.pair(plan.reference)
        log.info("reference layer, 2 actors: in process %.3f s, Ray %.3f s (%.2fx)",
                 reference["in_process_step_s"], reference["ray_step_s"], reference["ratio"])
        four = layers.pair(dataclasses.replace(plan.reference, actors=4))
        store = layers.pair(plan.reference, shared_memory=False)
        ray_calls = layers.pair(plan.reference, calls="ray")
        direct = layers.pair(plan.reference, transport="direct")
        model = model_step(cfg, out_dir, plan.model_steps, plan.model_warmup)
        log.info("%s model: in process %.1f ms, Ray %.1f ms (%.2fx)", cfg.run.name,
                 model["in_process_step_s"] * 1e3, model["ray_step_s"] * 1e3, model["ratio"])
        # The same data pipeline serves every variant: measured once, above.
        model_ray_calls = model_step(_with_experts(cfg, calls="ray"), out_dir,
                                     plan.model_steps, plan.model_warmup, pipeline=False)
        log.info("%s model, Ray calls instead of sockets: %.2fx", cfg.run.name,
                 model_ray_calls["ratio"])
        model_direct = model_step(_with_experts(cfg, transport="direct"), out_dir,
                                  plan.model_steps, plan.model_warmup, pipeline=False)
        log.info("%s model, direct transport: %.2fx", cfg.run.name, model_direct["ratio"])
        growth = _growth(plan, layers)
        # One actor's share, on the threads the reference layer's actors get.
        means = bench_moe.expert_compute_means(
            plan.reference, max(1, cores // plan.reference.actors), plan.means_repeats)
        log.info("expert compute: loop %.3f s, batched %.3f s; backward %.3f s, input "
                 "gradients alone %.3f s", means["loop_s"], means["batched_s"],
                 means["backward_s"], means["input_grad_first_s"])
    finally:
        if started:
            ray.shutdown()
    moved = reference["transport"]
    memcpy_s = bench_moe.memcpy_seconds(int(moved["bytes"]))
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cores": cores, "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__,
                    "cpu": platform.processor() or platform.machine()},
        "targets": TARGETS,
        "reference": reference,
        "reference_4_actors": four,
        "reference_object_store": store,
        "reference_ray_calls": ray_calls,
        "reference_direct": direct,
        "quickstart": model,  # the job's model (make bench: jobs/quickstart.yaml)
        "quickstart_ray_calls": model_ray_calls,
        "quickstart_direct": model_direct,
        "serial_calls_per_step": model["serial_calls_per_step"],
        "serial_calls_target": model["serial_calls_target"],
        "transport_fraction_of_memcpy": memcpy_s / moved["seconds"] if moved["seconds"] else
        float("inf"),
        "transport": {**moved, "memcpy_seconds": memcpy_s,
                      "object_store_seconds": store["transport"]["seconds"]},
        "small_batch_forward_ms": reference["small_batch_forward_ms"]["ray"],
        "small_batch_forward_in_process_ms": reference["small_batch_forward_ms"]["in_process"],
        "growth": growth,
        "expert_compute": means,
        "bench_seconds": time.perf_counter() - t_start,
        "config": config_to_dict(cfg),
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "results.md").write_text(table(result))
    line_panels([_panel(growth["tokens"], "tokens", "tokens per step"),
                 _panel(growth["experts"], "experts", "experts (top-k fixed)"),
                 _panel(growth["actors"], "actors", "expert actors")], out_dir / "growth.png")
    return result


def _with_experts(cfg: Config, **experts) -> Config:
    return dataclasses.replace(cfg, experts=dataclasses.replace(cfg.experts, **experts))


def _panel(rows: list[dict], key: str, label: str) -> dict:
    return {"title": f"step time (s) vs {label}", "xlabel": label, "ylabel": "s / step",
            "x": [r[key] for r in rows],
            "lines": {"in process": [r["in_process_step_s"] for r in rows],
                      "Ray path": [r["ray_step_s"] for r in rows]}}


def table(r: dict) -> str:
    """The results as the markdown table README quotes."""
    m, ref, four, store = r["quickstart"], r["reference"], r["reference_4_actors"], \
        r["reference_object_store"]
    calls, mc = r["reference_ray_calls"], r["quickstart_ray_calls"]
    direct, md = r["reference_direct"], r["quickstart_direct"]
    t = r["targets"]
    mach = r["machine"]

    def ok(good: bool) -> str:
        return "met" if good else "not met"

    sb = r["small_batch_forward_ms"]
    ec = r["expert_compute"]

    def layer_row(label: str, p: dict, forward_ms: bool = False) -> tuple:
        extra = f" ({p['small_batch_forward_ms']['ray']:.1f} ms)" if forward_ms else ""
        return label, f"{p['ray_step_s']:.3f} s = {p['ratio']:.2f}x{extra}", "(comparison)", ""

    def model_row(label: str, p: dict, serial: bool = False) -> tuple:
        extra = f" ({p['serial_calls_per_step']:.0f})" if serial else ""
        return (label, f"{p['ray_step_s'] * 1e3:.1f} ms / {p['in_process_step_s'] * 1e3:.1f} ms"
                f" = {p['ratio']:.2f}x{extra}", "(comparison)", "")

    rows = [
        ("Reference MoE layer, 2 expert actors: Ray / in process",
         f"{ref['ray_step_s']:.3f} s / {ref['in_process_step_s']:.3f} s = "
         f"**{ref['ratio']:.2f}x**", f"<= {t['reference_ratio']:.2f}",
         ok(ref["ratio"] <= t["reference_ratio"])),
        ("Reference MoE layer, 4 expert actors",
         f"{four['ray_step_s']:.3f} s = **{four['ratio']:.2f}x**",
         f"<= {t['reference_ratio']:.2f}", ok(four["ratio"] <= t["reference_ratio"])),
        layer_row("Reference layer, 2 actors, object store instead of shared memory", store),
        layer_row("Reference layer, 2 actors, direct transport (64-token forward)", direct,
                  forward_ms=True),
        layer_row("Reference layer, 2 actors, Ray calls instead of sockets (64-token forward)",
                  calls, forward_ms=True),
        (f"Quickstart model, whole step ({m['model']['moe_layers']} MoE layers)",
         f"{m['ray_step_s'] * 1e3:.1f} ms / {m['in_process_step_s'] * 1e3:.1f} ms = "
         f"**{m['ratio']:.2f}x**", f"<= {t['quickstart_ratio']:.2f}",
         ok(m["ratio"] <= t["quickstart_ratio"])),
        model_row("Quickstart model, Ray calls instead of sockets", mc),
        model_row("Quickstart model, direct transport (worker calls the actors; serial calls)",
                  md, serial=True),
        ("Worker's calls per step, in a row (all calls)",
         f"**{r['serial_calls_per_step']:.0f}** ({m['calls_per_step_total']:.0f})",
         f"<= 2L+1 = {r['serial_calls_target']}",
         ok(r["serial_calls_per_step"] <= r["serial_calls_target"])),
        ("Transport: memcpy time / time moving the same bytes",
         f"**{r['transport_fraction_of_memcpy']:.2f}** ({r['transport']['bytes'] / 1e6:.0f} MB "
         f"in {r['transport']['seconds'] * 1e3:.0f} ms; object store "
         f"{r['transport']['object_store_seconds'] * 1e3:.0f} ms)",
         f">= {t['transport_fraction_of_memcpy']}",
         ok(r["transport_fraction_of_memcpy"] >= t["transport_fraction_of_memcpy"])),
        ("64-token forward of the reference layer: Ray (in process)",
         f"**{sb:.1f} ms** ({r['small_batch_forward_in_process_ms']:.1f} ms)",
         f"<= {t['small_batch_forward_ms']:.0f} ms", ok(sb <= t["small_batch_forward_ms"])),
        ("One actor's experts, forward + backward: batched matmul / loop",
         f"{ec['batched_s']:.3f} s / {ec['loop_s']:.3f} s = "
         f"{ec['batched_s'] / ec['loop_s']:.2f}x", "(comparison)", ""),
        ("One actor's experts: input gradients alone / whole backward",
         f"{ec['input_grad_first_s']:.3f} s / {ec['backward_s']:.3f} s = "
         f"{ec['input_grad_first_s'] / ec['backward_s']:.2f}x", "(comparison)", ""),
        ("Ray Data pipeline, one worker: delivered / consumed",
         f"{m['data_pipeline']['delivered_samples_per_s']:.0f} / "
         f"{m['data_pipeline']['consumed_samples_per_s']:.0f} samples/s", "> 1x",
         ok(m["data_pipeline"]["headroom"] > 1)),
    ]
    lines = [f"`make bench`, {r['date']}: {mach['cores']} cores ({mach['cpu']}), Python "
             f"{mach['python']}, torch {mach['torch']}, Ray {mach['ray']}; medians of "
             f"side-by-side runs.", "", "| measure | result | target | |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", "Growth (a d 256 / hidden 1024 layer, top-2; Ray / in process; growth.png):", ""]
    for name, label in (("tokens", "tokens per step"), ("experts", "experts"),
                        ("actors", "expert actors")):
        cells = ", ".join(f"{row[name]}: {row['ratio']:.2f}x "
                          f"({row['ray_step_s']:.2f} s)" for row in r["growth"][name])
        lines.append(f"- {label}: {cells}")
    return "\n".join(lines) + "\n"

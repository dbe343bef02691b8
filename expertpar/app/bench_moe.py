"""One MoE layer, timed in process and through the Ray path, side by side (``expertpar bench``).

A step is what training does to a MoE layer: forward over ``tokens`` activations, a loss,
backward to the input and every parameter, global gradient norms, a clipped AdamW step. The
in-process path is the reference ``MoELayer``; the Ray path is the ``RemoteMoE`` bridge to a
router actor and expert actors, driven from this process as a train worker would drive it.
Both see the same activations and the same cores (torch threads pinned; see ``threads``).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch

from ..config import Config, config_from_dict
from ..moe import MoELayer, RouteContext
from ..train.names import expert_entries, gate_entries
from ..train.owners import ParameterOwner
from ..train.step import clip_coefficient


@dataclass(frozen=True)
class LayerSpec:
    """The workload: the issue's reference layer by default."""
    dim: int = 512
    hidden: int = 2048
    experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    tokens: int = 8192
    actors: int = 2
    precision: str = "float32"  # the experts' matmuls (model.moe.expert_precision)

    def config(self) -> Config:
        """A one-MoE-layer model config carrying this layer (what start_moe_actors reads)."""
        return config_from_dict({
            "run": {"name": "bench"},
            "data": {"train": "unused"},
            "model": {"dim": self.dim, "depth": 2, "heads": 1, "ffn_hidden": self.hidden,
                      "embed_dim": self.dim,
                      "moe": {"num_experts": self.experts, "top_k": self.top_k, "every": 2,
                              "expert_hidden": self.hidden,
                              "capacity_factor": self.capacity_factor,
                              "eval_capacity_factor": self.capacity_factor,
                              "expert_precision": self.precision}},
            "train": {"lr": 1e-3, "grad_clip": 1.0},
            "distributed": {"backend": "ray"},
            "experts": {"num_actors": self.actors, "cpus_per_actor": 0.5}})


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float

    @staticmethod
    def of(times: list[float]) -> "Timing":
        return Timing(statistics.median(times), min(times), max(times))


def _inputs(spec: LayerSpec, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(spec.tokens, spec.dim, generator=gen)
    g_TD = torch.randn(spec.tokens, spec.dim, generator=gen) / spec.tokens ** 0.5
    modality_T = torch.zeros(spec.tokens, dtype=torch.long)
    modality_T[spec.tokens * 3 // 4:] = 1  # a quarter text tokens, after the image tokens
    return x_TD.to(device), g_TD.to(device), modality_T.to(device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _step(layer, owners, x_TD, g_TD, modality_T, step: int) -> None:
    x = x_TD.clone().requires_grad_(True)  # the input gradient is computed, as in a model
    out = layer(x, modality_T, RouteContext(0, step))
    loss = (out.y_TD * g_TD).sum() + out.aux_loss
    loss.backward()
    _, coef = clip_coefficient(torch.cat([o.grad_norms(step) for o in owners]), 1.0)
    for owner in owners:
        owner.step(1e-3, coef)


def _timed(layer, owners, inputs, steps: range) -> list[float]:
    times = []
    for s in steps:
        t0 = time.perf_counter()
        _step(layer, owners, *inputs, step=s)
        _sync(inputs[0].device)
        times.append(time.perf_counter() - t0)
    for owner in owners:
        getattr(owner, "settle", lambda: None)()  # the last step's MoE update is part of it
    return times


def in_process(spec: LayerSpec, steps: int, warmup: int, device: str = "cpu") -> dict:
    """The reference layer's step time, and its small-batch forward latency."""
    cfg = spec.config()
    layer = MoELayer(spec.dim, cfg.model.moe, 0, seed=0).to(device)
    entries = [*gate_entries(0, layer), *[e for i, ffn in enumerate(layer.experts.experts)
                                          for e in expert_entries(0, i, ffn)]]
    owner = ParameterOwner(entries, cfg.train)
    times = _timed(layer, [owner], _inputs(spec, device=device), range(warmup + steps))[warmup:]
    return {"timing": Timing.of(times),
            "small_batch_forward_ms": small_batch_forward_ms(layer, spec, device=device)}


def on_ray(spec: LayerSpec, steps: int, warmup: int, *, device: str = "cpu",
           **experts) -> dict:
    """The Ray path's step time, with its calls and the bytes and seconds of its transport.
    ``device``: where this process (the train worker) holds the activations; ``experts``:
    settings of the experts config (shared_memory, calls, gpus_per_actor, router_gpus)."""
    import ray

    from ..distributed.actors import start_moe_actors
    from ..distributed.bridge import RayBackend
    from ..distributed.runtime import RemoteOwner

    cfg = spec.config()
    cfg = dataclasses.replace(cfg, experts=dataclasses.replace(cfg.experts, **experts))
    moe = start_moe_actors(cfg)
    try:
        backend = RayBackend(moe.router, device=device)
        layer = backend.build_layer(0, spec.dim, cfg.model.moe, 0)
        owners = [RemoteOwner(backend, lead=True)]
        inputs = _inputs(spec, device=device)
        _timed(layer, owners, inputs, range(warmup))
        ray.get(moe.router.call_counts.remote(reset=True))
        ray.get(moe.router.transport.remote())
        backend.links.meter.take()
        backend.calls_made.clear()
        timing = Timing.of(_timed(layer, owners, inputs, range(warmup, warmup + steps)))
        calls = Counter(ray.get(moe.router.call_counts.remote())) + backend.calls_made
        moved = [backend.links.meter.take(), ray.get(moe.router.transport.remote())]
        small = small_batch_forward_ms(layer, spec, device=device)
    finally:
        moe.shutdown()
    return {"timing": timing, "calls_per_step": {k: v / steps for k, v in sorted(calls.items())},
            # The worker<->router and router<->expert links, per step.
            "transport": {"bytes": sum(m["bytes"] for m in moved) / steps,
                          "seconds": sum(m["seconds"] for m in moved) / steps,
                          "gpu_bytes": sum(m["gpu_bytes"] for m in moved) / steps},
            "small_batch_forward_ms": small}


def small_batch_forward_ms(layer, spec: LayerSpec, tokens: int = 64, repeats: int = 30,
                           device: str = "cpu") -> float:
    """Median latency of one forward of ``tokens`` tokens through the layer (no gradient)."""
    x_TD, _, modality_T = _inputs(dataclasses.replace(spec, tokens=tokens), seed=1,
                                  device=device)
    layer.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x_TD, modality_T, RouteContext(0, 0))
            _sync(device)
            times.append(time.perf_counter() - t0)
    layer.train()
    return statistics.median(times[3:]) * 1e3


def memcpy_seconds(nbytes: int, repeats: int = 5) -> float:
    """One in-process copy of ``nbytes`` (median), the yardstick for the transport."""
    src = torch.empty(max(1, nbytes // 4), dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ffn_tflops(dim: int, hidden: int, tokens: int, *, device: str = "cpu",
               dtype: torch.dtype | None = torch.bfloat16, repeats: int = 10) -> float:
    """Achieved TFLOP/s of one expert FFN's forward and backward over ``tokens`` rows, under
    autocast to ``dtype`` (None: fp32). Counts 12 * T * D * H: two matmuls of 2 * T * D * H
    forward, twice that backward."""
    from ..moe.experts import FFN

    ffn = FFN(dim, hidden).to(device)
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    dev = torch.device(device).type

    def once() -> None:
        with torch.autocast(dev, dtype=dtype or torch.float32, enabled=dtype is not None):
            y = ffn(x)
        y.float().sum().backward()

    once()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 12 * tokens * dim * hidden / statistics.median(times) / 1e12


# Two means of the issue measured on one expert actor's share of the reference layer, as the
# actor runs it (its torch threads, fp32): the product keeps what pays, and these say what the
# others would give.

def batched_ffn(ffns, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """All of an actor's experts as one batched matmul per FFN matrix: rows padded to the
    largest expert's count, weights stacked (E, D, H) so each expert's slab is contiguous."""
    import torch.nn.functional as F

    n = max(x.shape[0] for x in xs)
    x_END = torch.zeros(len(xs), n, xs[0].shape[1])
    for e, x in enumerate(xs):
        x_END[e, :x.shape[0]] = x
    w1_EDH = torch.stack([f.fc1.weight.t() for f in ffns])
    w2_EHD = torch.stack([f.fc2.weight.t() for f in ffns])
    b1_E1H = torch.stack([f.fc1.bias for f in ffns])[:, None]
    b2_E1D = torch.stack([f.fc2.bias for f in ffns])[:, None]
    y_END = torch.baddbmm(b2_E1D, F.gelu(torch.baddbmm(b1_E1H, x_END, w1_EDH)), w2_EHD)
    return [y_END[e, :x.shape[0]] for e, x in enumerate(xs)]


def expert_compute_means(spec: LayerSpec, threads: int, repeats: int = 5) -> dict:
    """Forward and backward of one actor's experts, median seconds, interleaved runs:
    - ``loop_s`` the product's loop over experts, ``batched_s`` batched_ffn;
    - ``backward_s`` the whole backward, ``input_grad_first_s`` the time until the input
      gradients alone are ready (what the reply would wait for if the weight gradients came
      after it; they must still be done before the optimizer step)."""
    from ..moe.experts import FFN

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    per_actor = spec.experts // spec.actors
    rows = spec.tokens * spec.top_k // spec.experts
    # Uneven loads, as routing gives: ±10% around the mean, within capacity.
    counts = [max(1, int(rows * (0.9 + 0.2 * e / max(1, per_actor - 1))))
              for e in range(per_actor)]
    ffns = [FFN(spec.dim, spec.hidden) for _ in counts]
    xs = [torch.randn(n, spec.dim, generator=gen) for n in counts]

    def loop():
        ins = [x.clone().requires_grad_(True) for x in xs]
        torch.cat([f(x) for f, x in zip(ffns, ins)]).sum().backward()

    def batched():
        ins = [x.clone().requires_grad_(True) for x in xs]
        torch.cat(batched_ffn(ffns, ins)).sum().backward()

    saved = []

    def forward():
        saved.clear()
        for f, x in zip(ffns, xs):
            x = x.clone().requires_grad_(True)
            saved.append((x, f(x)))

    def whole_backward():
        forward()
        t0 = time.perf_counter()
        for _, y in saved:
            y.backward(torch.ones_like(y))
        return time.perf_counter() - t0

    def input_grad_first():
        forward()
        t0 = time.perf_counter()
        for x, y in saved:
            torch.autograd.grad(y, x, torch.ones_like(y))
        return time.perf_counter() - t0

    def timed(f):
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    runs: dict[str, list[float]] = {k: [] for k in ("loop_s", "batched_s", "backward_s",
                                                    "input_grad_first_s")}
    try:
        loop(), batched()  # warm-up
        for _ in range(repeats):
            runs["loop_s"].append(timed(loop))
            runs["batched_s"].append(timed(batched))
            runs["backward_s"].append(whole_backward())
            runs["input_grad_first_s"].append(input_grad_first())
    finally:
        torch.set_num_threads(before)
    out = {k: statistics.median(v) for k, v in runs.items()}
    return {**out, "threads": threads, "rows_per_expert": counts}

"""``expertpar gpu-check``: what a CUDA machine gives the expert path, in one short run.

``make gpu-check`` runs the GPU tests first, then this: the expert FFN's achieved bf16 TFLOP/s
against the GPU's dense bf16 peak (at the reference layer's size and at a large one), and the
reference MoE layer's step on the GPU in process against the Ray path with its expert actors
sharing the GPU: with the router on the CPU (tokens cross the host), on the GPU (tokens stay
there, CUDA IPC), and on the GPU with bfloat16 experts. It writes ``gpu_check.json`` and
prints one line per figure.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time
from pathlib import Path

import torch

from . import bench_moe
from .bench_moe import LayerSpec

log = logging.getLogger("expertpar")

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def peak_bf16(name: str) -> float | None:
    """The data-sheet peak of a GPU by its CUDA name (None when not in the table)."""
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return peak
    return None


def run_gpu_check(out_dir: Path, *, steps: int = 5, warmup: int = 2,
                  actors: int = 2) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("gpu-check needs a CUDA GPU; torch.cuda.is_available() is False "
                           f"(torch {torch.__version__})")
    import ray

    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(0)
    peak = peak_bf16(name)
    ref = LayerSpec()
    ffn = {label: bench_moe.ffn_tflops(d, h, t, device="cuda")
           for label, (d, h, t) in {"reference d512 h2048 16k rows": (512, 2048, 16384),
                                    "large d4096 h14336 16k rows": (4096, 14336, 16384)}.items()}
    for label, tflops in ffn.items():
        log.info("expert FFN bf16, %s: %.1f TFLOP/s%s", label, tflops,
                 f" ({tflops / peak:.0%} of the {peak:.0f} TFLOP/s peak of {name})"
                 if peak else f" ({name}: peak not in the table)")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        started = True
    reference, local = {}, {}
    # The reference layer: the router on the CPU (tokens cross the host), then on the GPU
    # (tokens stay there), then the same with bfloat16 experts (tensor cores).
    runs = {"float32, router on the CPU": ("float32", 0.0),
            "float32, router on the GPU": ("float32", 0.2),
            "bfloat16, router on the GPU": ("bfloat16", 0.2)}
    try:
        for label, (precision, router_gpus) in runs.items():
            spec = dataclasses.replace(ref, precision=precision)
            if precision not in local:
                local[precision] = bench_moe.in_process(spec, steps, warmup, device="cuda")
            remote = bench_moe.on_ray(dataclasses.replace(spec, actors=actors), steps, warmup,
                                      device="cuda", gpus_per_actor=(1 - router_gpus) / actors,
                                      router_gpus=router_gpus)
            here = local[precision]["timing"].median_s
            ratio = remote["timing"].median_s / here
            log.info("reference MoE layer on %s, %s experts, %d expert actors sharing the GPU:"
                     " in process %.1f ms, Ray path %.1f ms: %.2fx (%.0f of %.0f MB per step "
                     "stayed on the GPU)", name, label, actors, here * 1e3,
                     remote["timing"].median_s * 1e3, ratio,
                     remote["transport"]["gpu_bytes"] / 1e6, remote["transport"]["bytes"] / 1e6)
            reference[label] = {"in_process_step_s": here,
                                "ray_step_s": remote["timing"].median_s, "ratio": ratio,
                                "actors": actors, "router_gpus": router_gpus,
                                "transport": remote["transport"]}
    finally:
        if started:
            ray.shutdown()
    result = {"date": datetime.date.today().isoformat(), "gpu": name,
              "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "ray": ray.__version__,
              "peak_bf16_tflops": peak, "ffn_bf16_tflops": ffn,
              "ffn_fraction_of_peak": {k: v / peak for k, v in ffn.items()} if peak else None,
              # the keys (float32 experts, the router on the GPU), and every variant
              "reference": reference["float32, router on the GPU"],
              "reference_variants": reference,
              "seconds": time.perf_counter() - t_start}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1))
    return result

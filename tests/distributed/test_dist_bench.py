"""`expertpar bench` end to end on a tiny model: both paths timed, calls counted, the data
pipeline measured, the JSON written."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from expertpar.app.bench import run_bench

pytestmark = pytest.mark.slow


def test_bench_times_both_paths_and_the_data_pipeline(ray_local, synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{
        "distributed.backend": "ray", "experts.num_actors": 2, "experts.cpus_per_actor": 0.5})
    r = run_bench(cfg, tmp_path / "bench", steps=6, warmup=2)
    assert json.loads((tmp_path / "bench" / "step_time.json").read_text()) == r
    assert r["in_process_step_s"] > 0 and r["ray_step_s"] > 0
    assert r["ray_over_in_process"] == pytest.approx(r["ray_step_s"] / r["in_process_step_s"])
    # One MoE layer: forward and backward to the router, grad norms and step, per step.
    calls = r["ray_calls_per_step"]
    assert calls["worker->router/forward"] == calls["worker->router/backward"] == 1
    assert calls["worker->router/step"] == 1
    d = r["data_pipeline"]
    assert d["delivered_samples_per_s"] > 0
    assert d["consumed_samples_per_s"] == pytest.approx(32 / r["ray_step_s"])

"""`expertpar bench` end to end on tiny workloads: every measure present, calls counted, the
JSON, the table and the growth plot written."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import tiny_config
from expertpar.app.bench import BenchPlan, run_bench
from expertpar.app.bench_moe import LayerSpec

pytestmark = pytest.mark.slow

TINY = LayerSpec(dim=32, hidden=64, experts=4, top_k=2, tokens=256, actors=2)


def test_bench_measures_every_target_and_writes_its_files(ray_local, synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{
        "distributed.backend": "ray", "experts.num_actors": 2, "experts.cpus_per_actor": 0.5})
    plan = BenchPlan(reference=TINY, layer_steps=1, layer_warmup=1, growth=TINY,
                     growth_tokens=(256,), growth_experts=(4,), growth_actors=(2,),
                     model_steps=3, model_warmup=1, means_repeats=1)
    r = run_bench(cfg, tmp_path / "bench", plan)
    out = tmp_path / "bench"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(r))
    for key in ("reference", "reference_4_actors", "reference_object_store",
                "reference_ray_calls", "reference_direct", "quickstart", "quickstart_ray_calls",
                "quickstart_direct"):
        assert r[key]["in_process_step_s"] > 0 and r[key]["ray_step_s"] > 0, key
        assert r[key]["ratio"] == pytest.approx(r[key]["ray_step_s"] / r[key]["in_process_step_s"])
    assert r["reference_4_actors"]["layer"]["actors"] == 4
    assert r["reference_object_store"]["experts"] == {"shared_memory": False}
    assert r["reference_ray_calls"]["experts"] == {"calls": "ray"}
    # Direct: per layer the router plans and takes the weights' gradient, and the worker
    # fans out to the actors itself, once each way: 4L + 1 calls in a row.
    assert r["quickstart_direct"]["serial_calls_per_step"] == 5
    assert r["reference_direct"]["calls_per_step"]["worker->expert/forward"] == 2
    # One MoE layer: the worker calls forward, backward and step once each per step, and the
    # router calls each of the 2 actors once per direction.
    m = r["quickstart"]
    assert m["calls_per_step"]["worker->router/forward"] == 1
    assert m["calls_per_step"]["worker->router/backward"] == 1
    assert m["calls_per_step"]["worker->router/step"] == 1
    assert "worker->router/grad_norms" not in m["calls_per_step"]
    assert r["serial_calls_per_step"] == 3 == r["serial_calls_target"]
    assert r["reference"]["calls_per_step"]["router->expert/forward"] == 2
    assert r["transport"]["bytes"] > 0 and r["transport_fraction_of_memcpy"] > 0
    assert r["small_batch_forward_ms"] > 0
    assert [row["tokens"] for row in r["growth"]["tokens"]] == [256]
    assert [row["experts"] for row in r["growth"]["experts"]] == [4]
    assert [row["actors"] for row in r["growth"]["actors"]] == [2]
    # A workload in several series is timed once: the same figures wherever it appears.
    assert r["growth"]["actors"][0]["ray_step_s"] == r["reference"]["ray_step_s"]
    d = m["data_pipeline"]
    assert d["delivered_samples_per_s"] > 0
    assert d["consumed_samples_per_s"] == pytest.approx(32 / m["ray_step_s"])
    assert r["expert_compute"]["threads"] >= 1 and r["expert_compute"]["batched_s"] > 0
    table = (out / "results.md").read_text()
    assert "batched matmul / loop" in table and "input gradients alone" in table
    assert "Reference MoE layer, 2 expert actors" in table and "growth" not in table.lower()[:10]
    assert Image.open(out / "growth.png").size[0] == 3 * 420

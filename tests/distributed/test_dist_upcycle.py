"""A run made by `expertpar upcycle` trains on the Ray backend as in one process: the expert
actors and the router start from its step-0 checkpoint (experts from dense FFNs, fresh gates,
no AdamW state). The run is a BTX mix of two dense runs, so the two experts differ from the
start; single-run upcycling writes the same checkpoint layout (tests/train/test_upcycle.py
shows a BTX of a run and its copy to be `upcycle --experts 2`'s checkpoint, tensor for tensor).
"""
from __future__ import annotations

import pytest

from conftest import tiny_config
from expertpar.app import train
from expertpar.app.cli import main
from expertpar.config import load_config
from expertpar.train.checkpoint import latest_checkpoint, read_shards

pytestmark = pytest.mark.slow

DENSE = {"model.variant": "dense", "model.moe.top_k": 2, "model.moe.expert_hidden": 48,
         "train.steps": 4, "train.warmup_steps": 2, "train.checkpoint_every": 4,
         "data.eval": "null"}


def test_a_mixed_run_trains_on_ray_like_in_process(ray_local, synth_dir, tmp_path):
    dense = train(tiny_config(synth_dir, tmp_path / "dense", **DENSE))
    branch = train(tiny_config(synth_dir, tmp_path / "branch", **DENSE, **{
        "run.seed": 1, "data.max_train_samples": 800,
        "tokenizer.path": str(dense.run_dir / "tokenizer.json")}))
    runs = [str(dense.run_dir), str(branch.run_dir)]
    steps = ["--set", "train.steps=3", "--set", "train.checkpoint_every=3"]
    assert main(["upcycle", *runs, "--out", str(tmp_path / "local"), *steps]) == 0
    assert main(["upcycle", *runs, "--out", str(tmp_path / "ray"), *steps,
                 "--set", "distributed.backend=ray", "--set", "experts.num_actors=2",
                 "--set", "experts.cpus_per_actor=0.5"]) == 0
    ref = train(load_config(tmp_path / "local" / "config.yaml"))
    got = train(load_config(tmp_path / "ray" / "config.yaml"))
    assert len(got.losses) == 3
    assert got.losses == pytest.approx(ref.losses, rel=1e-5)
    # Every parameter and AdamW moment after 3 steps, as the parity tests check them.
    a = read_shards(latest_checkpoint(tmp_path / "local" / "checkpoints"))
    b = read_shards(latest_checkpoint(tmp_path / "ray" / "checkpoints"))
    assert sorted(a) == sorted(b) and "experts/L0_E1.safetensors" in a
    for file in a:
        assert sorted(a[file]) == sorted(b[file]), file
        for key, want in a[file].items():
            want, have = want.double(), b[file][key].double()
            err = float((have - want).norm() / want.norm().clamp_min(1e-30))
            assert err <= 1e-5, (file, key, err)

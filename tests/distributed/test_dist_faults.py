"""Fault injection: an expert actor dies mid-run. The run stops with an error naming it (no
hang), every checkpoint written before stays valid, and a re-run resumes from the last one on
the original loss curve."""
from __future__ import annotations

import json
import threading
import time

import pytest
import ray

from conftest import tiny_config
from expertpar.app import train
from expertpar.train.checkpoint import latest_checkpoint, read_train_state, verify

pytestmark = pytest.mark.slow


def _logged_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(l).get("step", 0) for l in path.read_text().splitlines() if l.strip()]
    return max(steps, default=0)


def _kill_an_expert_actor_after(run_dir, step: int, done: dict) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and _logged_step(run_dir) < step:
        time.sleep(0.05)
    for info in ray.util.list_named_actors(all_namespaces=True):
        if "-expert1" in info["name"]:
            ray.kill(ray.get_actor(info["name"], namespace=info["namespace"]))
            done["killed"] = info["name"]
            return


def test_lost_expert_actor_stops_the_run_and_a_rerun_resumes(ray_local, synth_dir, tmp_path):
    common = {"train.steps": 300, "train.checkpoint_every": 5, "train.log_every": 1}
    cfg = tiny_config(synth_dir, tmp_path / "ray", **common, **{
        "distributed.backend": "ray", "experts.num_actors": 2, "experts.cpus_per_actor": 0.5})
    done: dict = {}
    killer = threading.Thread(target=_kill_an_expert_actor_after, args=(cfg.run_dir, 7, done))
    killer.start()
    started = time.time()
    with pytest.raises(Exception) as failure:
        train(cfg)
    killer.join()
    assert "killed" in done, "the expert actor was never found to kill"
    assert time.time() - started < 200  # an error, not the router's 10-minute deadline
    message = str(failure.value)
    assert "expert actor 1 (hosting experts [(0, 1), (0, 3)]) died" in message, message
    assert "run the same command again to resume" in message

    ckpt = latest_checkpoint(cfg.run_dir / "checkpoints")
    verify(ckpt)
    resumed_at = read_train_state(ckpt)["step"]
    assert resumed_at >= 5 and resumed_at % 5 == 0

    # The re-run starts fresh actors from the checkpoint and follows the reference curve.
    again = train(cfg, stop_after=3)
    ref = train(tiny_config(synth_dir, tmp_path / "local", **common),
                stop_after=resumed_at + 3)
    assert again.losses == pytest.approx(ref.losses[resumed_at:], rel=1e-5)

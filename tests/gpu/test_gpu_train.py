"""Training end to end on one CUDA GPU: the train worker and the expert actors share it."""
import json
import logging

import pytest
import torch

from conftest import tiny_config
from expertpar.app import train

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("router_gpus", [0.0, 0.1])
def test_a_ray_job_shares_one_gpu_between_its_worker_and_bfloat16_expert_actors(
        synth_dir, tmp_path, caplog, router_gpus):
    cfg = tiny_config(synth_dir, tmp_path, **{
        "distributed.backend": "ray", "train.device": "cuda", "distributed.use_gpu": True,
        "distributed.gpus_per_worker": 0.5, "experts.num_actors": 2,
        "experts.gpus_per_actor": 0.2, "experts.router_gpus": router_gpus,
        "model.moe.expert_precision": "bfloat16",
        "train.steps": 40, "train.eval_every": 0, "train.checkpoint_every": 0})
    with caplog.at_level(logging.INFO, logger="expertpar"):
        result = train(cfg)
    topology = json.loads((cfg.run_dir / "ray_topology.json").read_text())
    assert [a["device"] for a in topology["expert_actors"]] == ["cuda", "cuda"]
    assert [a["precision"] for a in topology["expert_actors"]] == ["bfloat16"] * 2
    assert topology["router"]["device"] == ("cuda" if router_gpus else "cpu")
    assert "train worker 0 of 1 on cuda" in caplog.text
    assert result.steps_done == 40
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < first


def test_in_process_training_on_the_gpu_with_bfloat16_experts(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{
        "train.device": "cuda", "model.moe.expert_precision": "bfloat16", "train.steps": 40,
        "train.eval_every": 0, "train.checkpoint_every": 0})
    result = train(cfg)
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < first

"""Expert actors that asked for no GPU stay off the GPUs of a GPU node (Ray 2.60 shows every
GPU to every actor). The node's GPU is a logical resource here: no CUDA is needed."""
from __future__ import annotations

import pytest
import ray

from conftest import tiny_config
from expertpar.distributed.actors import start_moe_actors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def test_cpu_expert_actors_on_a_gpu_node_see_no_gpu(ray_with_a_gpu, synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{"distributed.backend": "ray",
                                              "experts.num_actors": 2,
                                              "experts.cpus_per_actor": 0.5})
    moe = start_moe_actors(cfg)
    try:
        assert len(moe.infos) == 2
        for info in moe.infos:
            assert info["gpu_ids"] == [] and info["device"] == "cpu"
            assert info["cuda_visible_devices"] == ""
    finally:
        moe.shutdown()

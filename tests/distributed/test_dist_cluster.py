"""Several nodes (simulated with ray.cluster_utils.Cluster) and logical GPUs on a CPU machine."""
from __future__ import annotations

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import tiny_config
from expertpar.distributed.placement import place_experts
from expertpar.app import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    # A head that hosts no expert (no GPU) and two worker nodes with 2 logical GPUs each.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2):
        c.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=c.address)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def test_expert_actors_spread_over_nodes_with_their_gpu_share_and_the_router_joins_them(
        cluster, synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{
        "distributed.backend": "ray", "experts.num_actors": 2, "experts.cpus_per_actor": 1,
        "experts.gpus_per_actor": 0.5, "experts.placement": "spread", "train.steps": 3,
        "model.depth": 4})
    result = train(cfg)
    assert result.steps_done == 3 and len(result.losses) == 3
    topo = json.loads((cfg.run_dir / "ray_topology.json").read_text())
    actors = topo["expert_actors"]
    # Placement: the shards each actor hosts are exactly what the pure function says.
    hosts = place_experts(cfg.num_moe_layers, cfg.model.moe.num_experts, 2)
    assert [[tuple(s) for s in a["shards"]] for a in actors] == hosts
    # Spread: two different nodes, neither of them the GPU-less head.
    nodes = {a["node_id"] for a in actors}
    head = ray.get_runtime_context().get_node_id()
    assert len(nodes) == 2 and head not in nodes
    # The router (0 CPUs: it could go anywhere) runs beside the experts, not on the head.
    assert topo["router"]["node_id"] in nodes
    # Each actor holds the fractional GPU share the config gives it.
    for a in actors:
        assert a["resources"].get("GPU") == pytest.approx(0.5)
        assert len(a["gpu_ids"]) == 1
        assert a["device"] == "cpu"  # logical GPUs only: CUDA is not there, the actor says so


def test_a_router_with_a_gpu_share_runs_on_the_first_expert_actors_gpu(cluster, synth_dir,
                                                                       tmp_path):
    from expertpar.distributed.actors import start_moe_actors
    cfg = tiny_config(synth_dir, tmp_path, **{
        "distributed.backend": "ray", "experts.num_actors": 2, "experts.gpus_per_actor": 0.5,
        "experts.router_gpus": 0.25, "model.depth": 4})
    moe = start_moe_actors(cfg)
    try:
        router = ray.get(moe.router.info.remote())
        first = moe.infos[0]
        assert router["resources"].get("GPU") == pytest.approx(0.25)
        assert router["node_id"] == first["node_id"] == moe.router_node
        # In the first expert actor's bundle (not merely on the same node), on its GPU.
        assert router["placement_group_id"] == moe.pg.id.hex()
        assert router["gpu_ids"] == first["gpu_ids"] and len(router["gpu_ids"]) == 1
        assert router["device"] == moe.router_device == "cpu"  # logical GPUs: no CUDA here
    finally:
        moe.shutdown()


def test_impossible_gpu_request_fails_fast_with_the_keys(cluster, synth_dir, tmp_path):
    from expertpar.distributed.actors import start_moe_actors
    cfg = tiny_config(synth_dir, tmp_path, **{
        "distributed.backend": "ray", "experts.num_actors": 2, "experts.gpus_per_actor": 3})
    with pytest.raises(RuntimeError, match="experts.gpus_per_actor"):
        start_moe_actors(cfg, timeout_s=5)

"""Several nodes (simulated with ray.cluster_utils.Cluster) and logical GPUs on a CPU machine:
placement over nodes, GPU shares, and a node lost mid-run."""
from __future__ import annotations

import json
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import tiny_config
from expertpar.distributed.placement import place_experts
from expertpar.app import train
from expertpar.train.metrics import read_metrics

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


def _logged_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return max((m["step"] for m in read_metrics(path) if "loss/total" in m),
               default=0) if path.exists() else 0


def test_expert_actors_spread_over_nodes_and_a_removed_nodes_experts_come_back_elsewhere(
        cluster, synth_dir, tmp_path):
    """A third GPU node joins; 3 expert actors spread over the 3 GPU nodes with their GPU
    share, the router beside them. Mid-run the third node is removed: the job recovers by
    itself, its experts restart on the two nodes left, and the run stays on one process's
    curve."""
    extra = cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    common = {"train.steps": 12, "train.checkpoint_every": 4, "train.log_every": 1,
              "model.depth": 4}
    cfg = tiny_config(synth_dir, tmp_path / "ray", **common, **{
        "distributed.backend": "ray", "experts.num_actors": 3, "experts.cpus_per_actor": 0.5,
        "experts.gpus_per_actor": 0.5, "experts.placement": "spread"})
    topology = cfg.run_dir / "ray_topology.json"
    seen: dict = {}

    def remove_the_extra_node():
        deadline = time.time() + 300
        while time.time() < deadline and _logged_step(cfg.run_dir) < 6:
            time.sleep(0.05)
        seen["before"] = json.loads(topology.read_text())
        cluster.remove_node(extra)

    remover = threading.Thread(target=remove_the_extra_node)
    remover.start()
    try:
        result = train(cfg)
    finally:
        remover.join()

    before = seen["before"]
    actors = before["expert_actors"]
    # Placement: the shards each actor hosts are exactly what the pure function says.
    hosts = place_experts(cfg.num_moe_layers, cfg.model.moe.num_experts, 3)
    assert [[tuple(s) for s in a["shards"]] for a in actors] == hosts
    # Spread: one actor on each GPU node, none on the GPU-less head.
    nodes = [a["node_id"] for a in actors]
    head = ray.get_runtime_context().get_node_id()
    assert len(set(nodes)) == 3 and head not in nodes and extra.node_id in nodes
    # The router (0 CPUs: it could go anywhere) runs beside the experts, not on the head.
    assert before["router"]["node_id"] in nodes
    # Each actor holds the fractional GPU share the config gives it.
    for a in actors:
        assert a["resources"].get("GPU") == pytest.approx(0.5)
        assert len(a["gpu_ids"]) == 1
        assert a["device"] == "cpu"  # logical GPUs only: CUDA is not there, the actor says so

    # The node's loss was recovered from: its expert actor (and whatever else it hosted) was
    # named, and every actor now runs on a node that is still there.
    assert result.steps_done == 12
    [recovery] = result.recoveries
    lost_actor = nodes.index(extra.node_id)
    assert f"expert actor {lost_actor}" in recovery["loss"], recovery["loss"]
    assert recovery["steps_lost"] <= 4
    after = json.loads(topology.read_text())["expert_actors"]
    assert len(after) == 3 and extra.node_id not in {a["node_id"] for a in after}
    ref = train(tiny_config(synth_dir, tmp_path / "local", **common))
    logged = {m["step"]: m["loss/total"] for m in read_metrics(cfg.run_dir / "metrics.jsonl")
              if "loss/total" in m}
    assert [logged[s] for s in range(1, 13)] == pytest.approx(ref.losses, rel=1e-5)


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


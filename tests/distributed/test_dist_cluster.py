"""Several nodes (simulated with ray.cluster_utils.Cluster) and logical GPUs on a CPU machine:
placement over nodes, GPU shares, and one run through a joining node, a preemption notice and
a node lost mid-run."""
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


def _topology(run_dir) -> dict:
    path = run_dir / "ray_topology.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet (or being rewritten)
        return {"expert_actors": []}


def _drain(cluster, node, seconds: float) -> None:
    """A spot instance's preemption notice, as Ray Core gets it (what Ray's own chaos tests
    send): the node drains, to be reclaimed ``seconds`` from now."""
    from ray.core.generated import autoscaler_pb2
    gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
    accepted, why = gcs.drain_node(
        node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot instance reclaimed", int((time.time() + seconds) * 1000))
    assert accepted, why


def _logged_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return max((m["step"] for m in read_metrics(path) if "loss/total" in m),
               default=0) if path.exists() else 0


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


def test_the_experts_grow_onto_a_joining_node_leave_a_preempted_one_and_survive_a_lost_one(
        cluster, synth_dir, tmp_path):
    """One run, experts.num_actors [1, 4], one expert actor per GPU node (each takes both of a
    node's logical GPUs). It starts on the 2 GPU nodes, spread (none on the GPU-less head, the
    router beside them). Then:
    - a third GPU node joins: at the next checkpoint the run grows to 3 actors, one on it;
    - that node gets a preemption notice (a drain with a deadline): the run stops after the
      step it is in, writes a checkpoint and moves back to 2 actors before the deadline,
      losing no finished step; the node is then reclaimed;
    - a node hosting an expert actor is removed without notice: a loss, recovered from the
      last checkpoint on the one GPU node left.
    The whole run stays on one process's loss curve."""
    a, b = cluster.worker_nodes
    common = {"train.steps": 24, "train.checkpoint_every": 4, "train.log_every": 1,
              "model.depth": 4}
    cfg = tiny_config(synth_dir, tmp_path / "ray", **common, **{
        "distributed.backend": "ray", "experts.num_actors": "[1, 4]",
        "experts.cpus_per_actor": 0.5, "experts.gpus_per_actor": 2,
        "experts.placement": "spread"})
    seen: dict = {}

    def wait_until(what, condition, timeout_s=240.0):
        deadline = time.time() + timeout_s
        while not condition():
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def actors_on():
        return [x["node_id"] for x in _topology(cfg.run_dir)["expert_actors"]]

    def run():
        try:
            seen["result"] = train(cfg)
        except BaseException as err:  # noqa: BLE001
            seen["error"] = err

    def running():
        assert "error" not in seen, seen["error"]
        return "result" not in seen

    # The run goes on in a thread: the cluster changes here (Ray's node processes want the
    # main thread).
    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_until("the first steps", lambda: _logged_step(cfg.run_dir) >= 2 or not running())
        seen["start"] = _topology(cfg.run_dir)
        c = cluster.add_node(num_cpus=2, num_gpus=2)
        wait_until("3 actors", lambda: len(actors_on()) == 3 or not running())
        seen["grown"] = _topology(cfg.run_dir)
        grown_at = _logged_step(cfg.run_dir)
        wait_until("a step on 3 actors", lambda: _logged_step(cfg.run_dir) > grown_at
                   or not running())
        _drain(cluster, c, seconds=120)
        drained_at = _logged_step(cfg.run_dir)
        wait_until("the move off the drained node", lambda: not running() or (
            len(actors_on()) == 2 and c.node_id not in actors_on()))
        cluster.remove_node(c)  # reclaimed
        moved_to = _logged_step(cfg.run_dir)
        wait_until("steps after the move",
                   lambda: _logged_step(cfg.run_dir) >= moved_to + 3 or not running())
        cluster.remove_node(b)  # no notice
    finally:
        thread.join()
    assert "error" not in seen, seen["error"]
    result = seen["result"]

    # Placement at the start: 2 actors, one on each GPU node, the router beside them.
    head = ray.get_runtime_context().get_node_id()
    start = seen["start"]["expert_actors"]
    assert sorted(x["node_id"] for x in start) == sorted([a.node_id, b.node_id])
    assert [[tuple(sh) for sh in x["shards"]] for x in start] == place_experts(
        cfg.num_moe_layers, cfg.model.moe.num_experts, 2)
    assert seen["start"]["router"]["node_id"] in {a.node_id, b.node_id} - {head}
    for x in start:
        assert x["resources"].get("GPU") == pytest.approx(2) and len(x["gpu_ids"]) == 2
        assert x["device"] == "cpu"  # logical GPUs only: CUDA is not there, the actor says so
    # Grown: the third actor on the node that joined.
    assert c.node_id in {x["node_id"] for x in seen["grown"]["expert_actors"]}

    grow, preempt, loss = result.recoveries
    assert grow["planned"] and "joined" in grow["loss"] and grow["resumed_from_step"] % 4 == 0
    assert preempt["planned"] and "preemption notice" in preempt["loss"]
    assert c.node_id in preempt["loss"]
    # Just in time: the checkpoint is of a step past the notice, so no finished step is lost.
    assert preempt["resumed_from_step"] >= drained_at
    assert grow["steps_lost"] == preempt["steps_lost"] == 0
    assert not loss["planned"] and "expert actor" in loss["loss"], loss["loss"]
    assert 0 < loss["steps_lost"] <= 4
    for r in result.recoveries:
        assert r["recovery_s"] is not None and r["recovery_s"] < 120
    assert [x["node_id"] for x in _topology(cfg.run_dir)["expert_actors"]] == [a.node_id]
    assert result.steps_done == 24

    ref = train(tiny_config(synth_dir, tmp_path / "local", **common))
    logged = {m["step"]: m["loss/total"] for m in read_metrics(cfg.run_dir / "metrics.jsonl")
              if "loss/total" in m}
    assert [logged[s] for s in range(1, 25)] == pytest.approx(ref.losses, rel=1e-5)

"""Expert placement, and how many actors fit, are pure functions: tested without Ray."""
import pytest

from expertpar.config import ConfigError, config_from_dict
from expertpar.distributed.elastic import StopSignal, actor_shapes, fit_count
from expertpar.distributed.placement import (actor_of, check_num_actors, owner_table,
                                             place_experts)


def test_layers_experts_spread_round_robin():
    # 2 layers x 4 experts on 3 actors: shard index l*4+e, actor = index % 3.
    hosts = place_experts(2, 4, 3)
    assert hosts == [[(0, 0), (0, 3), (1, 2)],
                     [(0, 1), (1, 0), (1, 3)],
                     [(0, 2), (1, 1)]]
    assert owner_table(hosts)[(1, 3)] == 1 == actor_of(1, 3, 4, 3)


@pytest.mark.parametrize("layers,experts,actors", [(1, 1, 1), (2, 4, 1), (2, 4, 2), (2, 4, 4),
                                                   (3, 8, 5), (2, 4, 8)])
def test_every_shard_placed_once_and_balanced(layers, experts, actors):
    hosts = place_experts(layers, experts, actors)
    flat = [s for h in hosts for s in h]
    assert sorted(flat) == [(l, e) for l in range(layers) for e in range(experts)]
    sizes = [len(h) for h in hosts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_one_layer_fans_out_to_distinct_actors():
    hosts = place_experts(3, 4, 4)
    owner = owner_table(hosts)
    for layer in range(3):
        assert len({owner[(layer, e)] for e in range(4)}) == 4


def test_more_actors_than_shards_is_refused_with_the_numbers():
    assert check_num_actors(8, 2, 4) is None
    msg = check_num_actors(9, 2, 4)
    assert "2 MoE layers x 4 experts = 8" in msg
    with pytest.raises(ValueError, match="num_actors=9"):
        place_experts(2, 4, 9)
    with pytest.raises(ConfigError, match="experts.num_actors"):
        config_from_dict({"data": {"train": "x"}, "distributed": {"backend": "ray"},
                          "experts": {"num_actors": 9}})


def test_expert_actors_share_their_nodes_cores_unless_told():
    from expertpar.distributed.actors import actor_threads
    infos = [{"node_id": "a", "cpus": 8}, {"node_id": "a", "cpus": 8},
             {"node_id": "b", "cpus": 4}, {"node_id": "a", "cpus": 8}]
    assert actor_threads(infos, None) == [2, 2, 4, 2]
    assert actor_threads(infos, 3) == [3, 3, 3, 3]
    assert actor_threads([{"node_id": "a", "cpus": 2}] * 4, None) == [1, 1, 1, 1]


def test_train_workers_share_their_nodes_cores_unless_told():
    import os
    from expertpar.distributed.runtime import worker_threads
    cores = len(os.sched_getaffinity(0))
    assert worker_threads(None, 1) == cores
    assert worker_threads(None, cores * 2) == 1
    assert worker_threads(5, 1) == 5


# ---------------------------------------------------------------- elastic: counts and stops

def test_a_range_of_actors_is_read_and_checked():
    base = {"data": {"train": "x"}, "distributed": {"backend": "ray"}}
    ex = config_from_dict({**base, "experts": {"num_actors": [2, 4]}}).experts
    assert (ex.min_actors, ex.max_actors, ex.elastic) == (2, 4, True)
    fixed = config_from_dict({**base, "experts": {"num_actors": 3}}).experts
    assert (fixed.min_actors, fixed.max_actors, fixed.elastic) == (3, 3, False)
    for bad in ([4, 2], [0, 2], [2], [1, 2, 3]):
        with pytest.raises(ConfigError, match=r"experts.num_actors.*\[min, max\]"):
            config_from_dict({**base, "experts": {"num_actors": bad}})
    with pytest.raises(ConfigError, match="experts.num_actors.*expert shards"):
        config_from_dict({**base, "experts": {"num_actors": [2, 9]}})  # 2 layers x 4 experts


def test_fit_count_places_the_workers_first_then_as_many_actors_as_fit():
    free = {"a": {"CPU": 2.0, "GPU": 2.0}, "b": {"CPU": 2.0, "GPU": 1.0}, "head": {"CPU": 2.0}}
    actor = {"CPU": 0.5, "GPU": 1.0}
    assert fit_count(free, [actor] * 5) == 3  # the GPUs bound it
    # Two workers of 1 CPU leave a CPU on two nodes: still room for three.
    assert fit_count(free, [actor] * 5, reserve=[{"CPU": 1.0}] * 2) == 3
    # Four workers of 1.5 CPUs leave 0.5 CPU on each GPU node: one actor on each.
    assert fit_count(free, [actor] * 5, reserve=[{"CPU": 1.5}] * 4) == 2
    assert fit_count({}, [actor]) == 0
    # The shapes are taken in order: a bigger first one (a router's share) that fits nowhere
    # stops the count.
    assert fit_count(free, [{"CPU": 0.5, "GPU": 3.0}, actor]) == 0


def test_actor_shapes_carry_the_routers_gpu_share_in_bundle_r_mod_a():
    cfg = config_from_dict({
        "data": {"train": "x"}, "distributed": {"backend": "ray", "num_workers": 2},
        "model": {"moe": {"routing_groups": 2}},
        "experts": {"num_actors": 3, "gpus_per_actor": 0.5, "router_gpus": 0.25,
                    "router_cpus": 1.0, "num_routers": 2}})
    assert actor_shapes(cfg, 3) == [{"CPU": 2.0, "GPU": 0.75}, {"CPU": 2.0, "GPU": 0.75},
                                    {"CPU": 1.0, "GPU": 0.5}]
    assert actor_shapes(cfg, 2, routers=False) == [{"CPU": 1.0, "GPU": 0.5}] * 2


def test_every_worker_stops_at_the_same_step_whoever_asks_first():
    # Workers read each answer a step after asking. Worker 1 has asked about step 7 (it reads
    # the answer after step 8); the notice comes while worker 0 is still finishing 7: both
    # must hear of the stop in time, so it is fixed at 9.
    s = StopSignal(start=4, checkpoint_every=5)
    assert s.poll(1, 7, "n1") is None
    assert s.request("preemption notice", at_checkpoint=False) == 9
    assert s.poll(0, 7, "n0") == (9, "preemption notice")  # read by worker 0 after step 8
    assert s.poll(1, 8, "n1") == (9, "preemption notice")  # read by worker 1 after step 9
    assert s.worker_nodes() == ["n0", "n1"]
    # A joining node waits for the next checkpoint step; a notice after it moves the stop
    # earlier, never later.
    s = StopSignal(start=0, checkpoint_every=5)
    s.poll(0, 6, "n0")
    assert s.request("node joined", at_checkpoint=True) == 10
    assert s.request("preemption notice", at_checkpoint=False) == 8
    assert s.request("node joined", at_checkpoint=True) == 8
    assert s.poll(0, 7, "n0") == (8, "preemption notice")
    # Before any worker asked: the first step whose answer the workers read.
    assert StopSignal(start=12, checkpoint_every=0).request("x", at_checkpoint=True) == 14


@pytest.mark.parametrize("seed", range(100))
def test_workers_in_any_interleaving_stop_together_and_none_is_stranded(seed):
    """The protocol as the workers run it (runtime.py's stop_requested), against StopSignal,
    in a random interleaving: 3 workers in lockstep (a step finishes only once every worker
    has finished the one before and not stopped there), each question processed by the actor
    some time before its answer is read, the request arriving at a random moment."""
    import random
    rng = random.Random(seed)
    signal, W = StopSignal(start=0, checkpoint_every=4 if seed % 2 else 0), 3
    done = [0] * W
    sent: list[list] = [[] for _ in range(W)]  # questions not yet processed, per worker
    answers: list[list] = [[] for _ in range(W)]  # processed, waiting to be read
    stop: list = [None] * W
    stopped_at: list = [None] * W
    requested = False
    for _ in range(10_000):
        if all(s is not None for s in stopped_at):
            break
        moves = []
        if not requested:
            moves.append(("request", None))
        for w in range(W):
            if sent[w]:
                moves.append(("process", w))
            nxt = done[w] + 1
            if stopped_at[w] is None and all(d >= nxt - 1 for d in done):
                # Reading the answer to the question before: it must have been processed.
                if not sent[w] or len(sent[w]) == 0:
                    moves.append(("finish", w))
        kind, w = rng.choice(moves)
        if kind == "request":
            requested = True
            signal.request("why", at_checkpoint=bool(seed % 2))
        elif kind == "process":
            answers[w].append(signal.poll(w, sent[w].pop(0), f"n{w}"))
        else:
            # Every other worker must still be there to run this step with w.
            assert all(s is None or s >= done[w] + 1 for s in stopped_at), "stranded"
            done[w] += 1
            answer = answers[w].pop(0) if answers[w] else None
            sent[w].append(done[w])
            stop[w] = answer or stop[w]
            if stop[w] and done[w] >= stop[w][0]:
                stopped_at[w] = done[w]
    assert requested and len(set(stopped_at)) == 1 and stopped_at[0] is not None, stopped_at
    assert stopped_at[0] % 4 == 0 if seed % 2 else True

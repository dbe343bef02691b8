"""Expert placement is a pure function: tested without Ray."""
import pytest

from expertpar.config import ConfigError, config_from_dict
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

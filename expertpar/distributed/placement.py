"""Which expert actor hosts which (MoE layer, expert): pure functions, tested without Ray.

Every MoE layer has E experts, so a model has L * E expert shards. Shard (l, e) goes to actor
``(l * E + e) % A``: the experts of one layer sit on consecutive actors, so a layer's calls fan
out to min(E, A) different actors at once, and shards are spread evenly (loads differ by at most
one shard). More actors than shards would leave actors with nothing to do, so it is refused;
replicating hot experts is future work.
"""
from __future__ import annotations

from ..config import check_num_actors

Shard = tuple[int, int]  # (MoE layer index, expert index)


def actor_of(layer: int, expert: int, num_experts: int, num_actors: int) -> int:
    return (layer * num_experts + expert) % num_actors


def place_experts(num_layers: int, num_experts: int, num_actors: int) -> list[list[Shard]]:
    """The shards of each actor, in (layer, expert) order."""
    problem = check_num_actors(num_actors, num_layers, num_experts)
    if problem:
        raise ValueError(f"num_actors={num_actors}: {problem}")
    hosts: list[list[Shard]] = [[] for _ in range(num_actors)]
    for layer in range(num_layers):
        for expert in range(num_experts):
            hosts[actor_of(layer, expert, num_experts, num_actors)].append((layer, expert))
    return hosts


def owner_table(hosts: list[list[Shard]]) -> dict[Shard, int]:
    """(layer, expert) -> actor index, the inverse of ``place_experts``."""
    return {shard: a for a, shards in enumerate(hosts) for shard in shards}

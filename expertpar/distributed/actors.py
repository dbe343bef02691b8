"""Start (and stop) the MoE side of a job: expert actors on a placement group, one router.

Actors are owned by the driver and not detached, so none outlives its job; their names carry
the job's namespace and run, so two jobs never collide.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import Config
from .expert_actor import ExpertActor
from .placement import owner_table, place_experts
from .router_actor import RouterActor

log = logging.getLogger("expertpar")


@dataclass
class MoEActors:
    router: object
    actors: list
    hosts: list[list[tuple[int, int]]]
    pg: object
    infos: list[dict]  # per actor: node, shards, resources, device

    def failure_summary(self, timeout_s: float = 10.0) -> str:
        """Which MoE actors are gone (after a failed job), in words."""
        dead = []
        for name, handle, what in [("router", self.router, "the gates"),
                                   *[(f"expert actor {a}", h, f"experts {self.hosts[a]}")
                                     for a, h in enumerate(self.actors)]]:
            try:
                ray.get(handle.__ray_ready__.remote(), timeout=timeout_s)
            except Exception:  # dead, or not answering: either way it is the culprit
                dead.append(f"{name} (hosting {what}) died")
        return "; ".join(dead) if dead else "a train worker failed (see its error above)"

    def shutdown(self) -> None:
        for handle in [self.router, *self.actors]:
            try:
                ray.kill(handle)
            except Exception as err:  # an actor that already died is fine  # noqa: BLE001
                log.debug("kill: %r", err)
        remove_placement_group(self.pg)


def start_moe_actors(cfg: Config, checkpoint: str | None = None, *,
                     timeout_s: float = 120.0) -> MoEActors:
    """Place and start the expert actors and the router; each restores its own part of
    ``checkpoint`` (a verified checkpoint directory) when given."""
    L, E, A = cfg.num_moe_layers, cfg.model.moe.num_experts, cfg.experts.num_actors
    hosts = place_experts(L, E, A)
    ex = cfg.experts
    bundle = {"CPU": ex.cpus_per_actor}
    if ex.gpus_per_actor:
        bundle["GPU"] = ex.gpus_per_actor
    strategy = "SPREAD" if ex.placement == "spread" else "PACK"
    pg = placement_group([dict(bundle) for _ in range(A)], strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"expert actors: the cluster cannot fit {A} x {bundle} "
                           f"(experts.num_actors, experts.cpus_per_actor, experts.gpus_per_actor)"
                           f" within {timeout_s:.0f}s; resources: {ray.cluster_resources()}")
    tag = uuid.uuid4().hex[:8]
    actor_cls = ray.remote(ExpertActor)
    actors = []
    for a, host in enumerate(hosts):
        actors.append(actor_cls.options(
            name=f"expertpar-{cfg.run.name}-{tag}-expert{a}",
            num_cpus=ex.cpus_per_actor, num_gpus=ex.gpus_per_actor or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=a),
        ).remote(host, cfg.model.dim, cfg.model.moe, cfg.train, cfg.run.seed, checkpoint))
    router = ray.remote(RouterActor).options(
        name=f"expertpar-{cfg.run.name}-{tag}-router", num_cpus=ex.router_cpus,
        max_concurrency=4 * cfg.distributed.num_workers + 8,
    ).remote(cfg.model.dim, cfg.model.moe, cfg.train, L, cfg.run.seed, actors,
             owner_table(hosts), checkpoint)
    moe = MoEActors(router, actors, hosts, pg, [])
    try:
        moe.infos = ray.get([a.info.remote() for a in actors])
        ray.get(router.grad_norms.remote(-1))  # the router is up and reaches every actor
    except Exception:
        moe.shutdown()
        raise
    return moe

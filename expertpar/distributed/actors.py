"""Start (and stop) the MoE side of a job: expert actors on a placement group, one router.

Actors are owned by the driver and not detached, so none outlives its job; their names carry
the job's namespace and run, so two jobs never collide.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import Config
from .expert_actor import ExpertActor, shard_file
from .placement import owner_table, place_experts
from .router_actor import RouterActor

log = logging.getLogger("expertpar")


def ray_init(cfg: Config) -> bool:
    """Attach to a cluster (distributed.address, else RAY_ADDRESS) or start an embedded Ray.

    Returns True when this call started Ray (so the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    address = cfg.distributed.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # Logical CPUs: enough for the workers, the expert actors and a Ray Data actor per
        # worker even on a 2-core machine (the OS shares the cores; Ray only counts).
        need = (cfg.distributed.num_workers * (cfg.distributed.cpus_per_worker + 1)
                + cfg.experts.num_actors * cfg.experts.cpus_per_actor + 2)
        num_cpus = cfg.distributed.embedded_num_cpus or max(os.cpu_count() or 1, int(need + 0.5))
        # The dashboard serves the state API that Ray Train's clean-up polls; it listens on
        # 127.0.0.1 only.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=True)
    return True


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


def start_moe_actors(cfg: Config, shards: dict | None = None, *,
                     timeout_s: float = 120.0) -> MoEActors:
    """Place and start the expert actors and the router, optionally from checkpoint shards."""
    shards = shards or {}
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
        state = {shard_file(l, e): shards[shard_file(l, e)] for l, e in host
                 if shard_file(l, e) in shards}
        actors.append(actor_cls.options(
            name=f"expertpar-{cfg.run.name}-{tag}-expert{a}",
            num_cpus=ex.cpus_per_actor, num_gpus=ex.gpus_per_actor or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=a),
        ).remote(host, cfg.model.dim, cfg.model.moe, cfg.train, cfg.run.seed, state or None))
    router = ray.remote(RouterActor).options(
        name=f"expertpar-{cfg.run.name}-{tag}-router", num_cpus=ex.router_cpus,
        max_concurrency=4 * cfg.distributed.num_workers + 8,
    ).remote(cfg.model.dim, cfg.model.moe, cfg.train, L, cfg.run.seed, actors,
             owner_table(hosts), shards.get("router.safetensors"))
    moe = MoEActors(router, actors, hosts, pg, [])
    try:
        moe.infos = ray.get([a.info.remote() for a in actors])
        ray.get(router.grad_norms.remote(-1))  # the router is up and reaches every actor
    except Exception:
        moe.shutdown()
        raise
    return moe

"""Start (and stop) the MoE side of a job: expert actors on a placement group, one router.

Actors are owned by the driver and not detached, so none outlives its job; their names carry
the job's namespace and run, so two jobs never collide.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import (placement_group, placement_group_table,
                                      remove_placement_group)
from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                            PlacementGroupSchedulingStrategy)

from ..config import Config
from .elastic import actor_shapes
from .expert_actor import ExpertActor
from .placement import owner_table, place_experts
from .router_actor import RouterActor
from .wire import process_alive, sweep_dead

log = logging.getLogger("expertpar")


@dataclass
class MoEActors:
    routers: list  # router r routes group r (experts.num_routers); router 0 leads
    actors: list
    hosts: list[list[tuple[int, int]]]
    pg: object
    infos: list[dict]  # per actor: node, shards, resources, device
    router_node: str = ""  # the node router 0 runs on
    router_device: str = "cpu"  # where router 0 gates (cuda with experts.router_gpus)
    router_infos: list[dict] = field(default_factory=list)  # per router: RouterActor.info
    _starting: list = field(default_factory=list)  # launch's calls still to wait for
    _closed: bool = False

    def finish_start(self, threads_per_actor: int | None, timeout_s: float = 600.0) -> None:
        """Wait until every actor is up (``timeout_s`` at most: an actor that never starts
        must not hold the job), give the expert actors their torch threads, check that every
        router reaches every actor, and record where each runs. On failure every actor goes,
        and the error is raised."""
        try:
            ray.get(self._starting, timeout=timeout_s)
            infos = ray.get([a.info.remote() for a in self.actors], timeout=timeout_s)
            threads = actor_threads(infos, threads_per_actor)
            for info, n in zip(infos, threads):
                info["threads"] = n
            ray.get([h.set_threads.remote(n) for h, n in zip(self.actors, threads)])
            self.infos = infos
            # Every router is up and reaches every actor.
            ray.get([r.grad_norms.remote(-1) for r in self.routers])
            self.router_infos = ray.get([r.info.remote() for r in self.routers])
            info = ray.get(self.router.address.remote())
            self.router_device, self.router_node = info["device"], info["address"][1]
        except Exception:
            self.shutdown()
            raise

    def nodes(self) -> set[str]:
        """The nodes the expert actors and routers run on (once ``finish_start`` knows)."""
        return {i["node_id"] for i in [*self.infos, *self.router_infos]}

    @property
    def router(self):
        """Router 0, which speaks for every router and expert actor."""
        return self.routers[0]

    def lost_actors(self, timeout_s: float = 10.0) -> list[str]:
        """The MoE actors that are gone or do not answer, in words (after a failed step)."""
        routers = [("router", self.router, "the gates")] if len(self.routers) == 1 else [
            (f"router {r}", h, f"the gates of group {r}") for r, h in enumerate(self.routers)]
        named = [*routers, *[(f"expert actor {a}", h, f"experts {self.hosts[a]}")
                             for a, h in enumerate(self.actors)]]
        refs = [h.__ray_ready__.remote() for _, h, _ in named]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        lost = []
        for (name, _, what), ref in zip(named, refs):
            try:
                ray.get(ref, timeout=0)
            except Exception:  # dead, or not answering: either way it is lost  # noqa: BLE001
                lost.append(f"{name} (hosting {what})")
        return lost

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            stop_actors([*self.routers, *self.actors], [*self.infos, *self.router_infos])
        finally:
            remove_placement_group(self.pg)


def stop_actors(handles: list, infos: list[dict]) -> None:
    """Stop the actors ``handles`` (``infos``: what their ``info`` said, those known) so that
    none leaves a shared buffer behind. Each releases its buffers first (a killed process
    cannot); a dead or stuck one is not waited for. ``ray.kill`` returns before the process
    is gone, and a buffer is swept only once its creator is: so wait a little for the
    processes on this node, then sweep."""
    ray.wait([h.close.remote() for h in handles], num_returns=len(handles), timeout=10)
    for handle in handles:
        try:
            ray.kill(handle)
        except Exception as err:  # an actor that already died is fine  # noqa: BLE001
            log.debug("kill: %r", err)
    here = ray.get_runtime_context().get_node_id()
    _wait_gone([i["pid"] for i in infos if "pid" in i and i.get("node_id") == here])
    sweep_dead()


def _wait_gone(pids: list[int], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if process_alive(p)]
        if pids:
            time.sleep(0.05)


def start_moe_actors(cfg: Config, checkpoint: str | None = None, *,
                     num_actors: int | None = None, timeout_s: float = 120.0) -> MoEActors:
    """Place and start ``num_actors`` expert actors (default: experts.num_actors, its max for
    a range) and the routers; each restores its own part of ``checkpoint`` (a verified
    checkpoint directory) when given. Returns once every one is up."""
    moe = launch_moe_actors(cfg, checkpoint, num_actors=num_actors, timeout_s=timeout_s)
    moe.finish_start(cfg.experts.threads_per_actor)
    return moe


def launch_moe_actors(cfg: Config, checkpoint: str | None = None, *,
                      num_actors: int | None = None, timeout_s: float = 120.0) -> MoEActors:
    """``start_moe_actors`` up to the handles: the actors are placed and starting (processes,
    imports, checkpoint shards), and calls to them wait until they are up; ``finish_start``
    waits for that. The Ray job starts Ray Train meanwhile."""
    L, E = cfg.num_moe_layers, cfg.model.moe.num_experts
    A = num_actors or cfg.experts.max_actors
    hosts = place_experts(L, E, A)
    ex = cfg.experts
    strategy = "SPREAD" if ex.placement == "spread" else "PACK"
    # Router r's GPU share goes in expert actor (r mod A)'s bundle: one GPU for both.
    bundles = actor_shapes(cfg, A)
    R = ex.num_routers
    tag = uuid.uuid4().hex[:8]
    # Named like the actors: a placement group made by an actor (a sweep's trial) outlives
    # it, and whoever cleans up after one finds its group by the run's name (app/sweep.py).
    pg = placement_group(bundles, strategy=strategy, name=f"expertpar-{cfg.run.name}-{tag}")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"expert actors: the cluster cannot fit the bundles {bundles} "
                           f"(experts.num_actors, experts.cpus_per_actor, experts.gpus_per_actor"
                           f", experts.router_gpus) within {timeout_s:.0f}s; resources: "
                           f"{ray.cluster_resources()}")
    actor_cls = ray.remote(ExpertActor)
    gpus_in_cluster = bool(ray.cluster_resources().get("GPU", 0))
    actors = []
    for a, host in enumerate(hosts):
        actors.append(actor_cls.options(
            name=f"expertpar-{cfg.run.name}-{tag}-expert{a}",
            num_cpus=ex.cpus_per_actor, num_gpus=ex.gpus_per_actor or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=a),
            **hide_gpus(ex.gpus_per_actor, gpus_in_cluster),
        ).remote(host, cfg.model.dim, cfg.model.moe, cfg.train, cfg.run.seed, checkpoint,
                 ex.shared_memory, ex.calls == "socket"))
    # Router r goes where the experts are (expert bundle r mod A's node): with 0 CPUs it
    # could otherwise land on a GPU-less head, one network hop from workers and experts alike.
    # With a GPU share it runs in that bundle, on that expert actor's GPU.
    bundle_nodes = placement_group_table(pg)["bundles_to_node_id"]
    routers_on = Counter(bundle_nodes[r % A] for r in range(R))
    routers: list = []
    for r in range(R):
        near_experts = (PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r % A)
                        if ex.router_gpus else NodeAffinitySchedulingStrategy(
                            node_id=bundle_nodes[r % A], soft=False))
        routers.append(ray.remote(RouterActor).options(
            name=f"expertpar-{cfg.run.name}-{tag}-router{'' if r == 0 else r}",
            num_cpus=ex.router_cpus, num_gpus=ex.router_gpus or None,
            max_concurrency=4 * cfg.distributed.num_workers + 2 * R + 8,
            scheduling_strategy=near_experts,
            **hide_gpus(ex.router_gpus, gpus_in_cluster),
        ).remote(cfg.model.dim, cfg.model.moe, cfg.train, L, cfg.run.seed, actors,
                 owner_table(hosts), checkpoint, ex.shared_memory, ex.router_threads, ex.calls,
                 index=r, num_routers=R, lead=routers[0] if r else None,
                 routers_here=routers_on[bundle_nodes[r % A]], transport=ex.transport,
                 timeout_s=ex.call_timeout_s))
    moe = MoEActors(routers, actors, hosts, pg, [])
    if R > 1:  # queued first: router 0 steps the others
        moe._starting = [routers[0].set_routers.remote(routers[1:])]
    return moe


def hide_gpus(gpus: float, gpus_in_cluster: bool) -> dict:
    """Actor options for an actor asking ``gpus``: Ray 2.60 shows every GPU of a node to an
    actor that asked for none, and a CPU expert actor (or router) on a GPU node must not
    initialise CUDA there (it would take memory on GPU 0)."""
    return ({"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
            if not gpus and gpus_in_cluster else {})


def actor_threads(infos: list[dict], fixed: int | None) -> list[int]:
    """torch threads per expert actor: ``fixed``, else the cores of its node shared evenly
    by the expert actors there (they compute at the same time, while the workers wait)."""
    if fixed:
        return [fixed] * len(infos)
    per_node = Counter(info["node_id"] for info in infos)
    return [max(1, info["cpus"] // per_node[info["node_id"]]) for info in infos]


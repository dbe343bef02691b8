"""Moves the job plans (nothing is lost): a preemption notice for a node the job uses, and a
node that joins while ``experts.num_actors`` is a [min, max] range with room to grow.

Either way the train workers stop together at one step, once its checkpoint is written, and
the driver re-places the expert shards on the nodes that are there and not draining, exactly
as a recovery does (app/ray_job.py), but without running a finished step again:
- a preemption notice (the node drains: Ray Core's drain with reason PREEMPTION, what the
  autoscaler and spot-instance integrations send) stops the workers after the step they are
  in, inside the drain window, so the checkpoint is just in time;
- a joining node stops them at the next checkpoint step, so growth writes no extra one.

The workers agree on the step through one small actor (``StopSignal``). Each sends it a
question after every step and reads the answer after the next one, so the call never waits on
the hot path. A request fixes the stop two steps past the furthest step any worker has asked
about: no worker can have finished the next step without the others, and every worker asks
about that next step after the request, so each reads the stop in time to stop at it.
"""
from __future__ import annotations

import logging
import threading
import time

import ray

from ..config import Config

log = logging.getLogger("expertpar")

Resources = dict[str, float]


def fit_count(free: dict[str, Resources], shapes: list[Resources], *,
              reserve: list[Resources] = ()) -> int:
    """How many of ``shapes`` (in order) fit in the nodes' ``free`` resources, after the
    ``reserve`` bundles (placed first, where they fit). A greedy first fit onto the node with
    the most room: what Ray's placement can do, give or take fragmentation."""
    room = {node: dict(r) for node, r in free.items()}

    def take(shape: Resources) -> bool:
        fits = [n for n, r in room.items() if all(r.get(k, 0.0) + 1e-9 >= v
                                                  for k, v in shape.items())]
        if not fits:
            return False
        node = max(fits, key=lambda n: tuple(room[n].get(k, 0.0) for k in sorted(shape)))
        for k, v in shape.items():
            room[node][k] = room[node].get(k, 0.0) - v
        return True

    for shape in reserve:
        take(shape)
    count = 0
    for shape in shapes:
        if not take(shape):
            break
        count += 1
    return count


def actor_shapes(cfg: Config, count: int, *, routers: bool = True) -> list[Resources]:
    """The resources of ``count`` expert actors; with ``routers``, router r's GPU share rides
    in bundle r mod count, as start_moe_actors places it."""
    ex = cfg.experts
    shapes = [{"CPU": ex.cpus_per_actor, **({"GPU": ex.gpus_per_actor}
                                            if ex.gpus_per_actor else {})} for _ in range(count)]
    for r in range(ex.num_routers if routers and ex.router_gpus and count else 0):
        shapes[r % count]["GPU"] = shapes[r % count].get("GPU", 0.0) + ex.router_gpus
        shapes[r % count]["CPU"] += ex.router_cpus
    return shapes


def worker_shape(cfg: Config) -> Resources:
    """One Ray Train worker's resources (ScalingConfig's resources_per_worker)."""
    d = cfg.distributed
    return {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.use_gpu else {})}


def worker_shapes(cfg: Config) -> list[Resources]:
    return [worker_shape(cfg) for _ in range(cfg.distributed.num_workers)]


# Per train worker, beside it: its Ray Data actor (distributed/data.py, 0.5 CPU) and room for
# the read tasks that feed it.
DATA_CPUS_PER_WORKER = 1.0


def total(shapes: list[Resources]) -> Resources:
    """The sum of ``shapes``, resource by resource."""
    out: Resources = {}
    for shape in shapes:
        for k, v in shape.items():
            out[k] = out.get(k, 0.0) + v
    return out


def job_shapes(cfg: Config) -> list[Resources]:
    """Everything one Ray job of ``cfg`` holds while it trains: its train workers, each one's
    Ray Data share, the expert actors at their most (routers' GPU shares in their bundles) and
    the routers' own CPUs where no bundle carries them."""
    ex = cfg.experts
    routers = ([] if ex.router_gpus or not ex.router_cpus
               else [{"CPU": ex.router_cpus} for _ in range(ex.num_routers)])
    return [*worker_shapes(cfg),
            *[{"CPU": DATA_CPUS_PER_WORKER} for _ in range(cfg.distributed.num_workers)],
            *actor_shapes(cfg, ex.max_actors), *routers]


def draining_nodes() -> dict[str, int]:
    """Nodes being drained (hex id -> deadline in ms since the epoch, 0: none given)."""
    return ray._private.state.state.get_draining_nodes() or {}


def free_resources() -> dict[str, Resources]:
    """Each live node's unreserved resources, but for the draining ones."""
    draining = draining_nodes()
    return {n: r for n, r in ray._private.state.available_resources_per_node().items()
            if n not in draining}


def actor_count(cfg: Config, settle_s: float = 1.5) -> int:
    """How many expert actors to place now: ``experts.num_actors`` when it is a count; for a
    range, as many as the live, non-draining nodes hold beside the train workers (placed by
    the coming fit), within [min, max]. Below min, min: the placement then waits for room.

    Right after a stop, the last fit's actors and workers are still handing their resources
    back (Ray frees them asynchronously): the count is taken again until it has not grown for
    ``settle_s``."""
    ex = cfg.experts
    if not ex.elastic:
        return ex.max_actors
    shapes, reserve = actor_shapes(cfg, ex.max_actors), worker_shapes(cfg)
    fits, since = fit_count(free_resources(), shapes, reserve=reserve), time.monotonic()
    while fits < ex.max_actors and time.monotonic() - since < settle_s:
        time.sleep(0.1)
        now = fit_count(free_resources(), shapes, reserve=reserve)
        if now > fits:
            fits, since = now, time.monotonic()
    return max(ex.min_actors, min(ex.max_actors, fits))


class StopSignal:
    """Where the train workers learn, after each step, whether to stop there (see above): a
    Ray actor of the driver's (``start_stop_signal``)."""

    def __init__(self, start: int, checkpoint_every: int):
        self.start, self.every = start, checkpoint_every
        self.asked: dict[int, int] = {}  # rank -> the last step it asked about
        self.nodes: dict[int, str] = {}  # rank -> its node
        self.stop_at: int | None = None
        self.reason: str | None = None

    def poll(self, rank: int, done: int, node_id: str) -> tuple[int, str] | None:
        """Worker ``rank`` has finished step ``done``: the stop fixed so far (step, reason)."""
        self.asked[rank], self.nodes[rank] = done, node_id
        return (self.stop_at, self.reason) if self.stop_at is not None else None

    def request(self, reason: str, at_checkpoint: bool) -> int:
        """Stop at the first step every worker will hear of in time (at a checkpoint step, if
        asked); an earlier stop already fixed stands, a later one gives way."""
        first = max(self.asked.values(), default=self.start) + 2
        at = -(-first // self.every) * self.every if at_checkpoint and self.every else first
        if self.stop_at is None or at < self.stop_at:
            self.stop_at, self.reason = at, reason
        return self.stop_at

    def worker_nodes(self) -> list[str]:
        return sorted(set(self.nodes.values()))


def start_stop_signal(start: int, checkpoint_every: int):
    return ray.remote(StopSignal).options(num_cpus=0).remote(start, checkpoint_every)


class Watcher:
    """A driver thread, while a fit runs: asks the workers to stop when a node the job uses
    starts draining, or (num_actors a range) when joining nodes have room for more actors."""

    def __init__(self, cfg: Config, signal, moe, poll_s: float = 1.0):
        self.cfg, self.signal, self.moe = cfg, signal, moe  # moe: distributed/actors.MoEActors
        self.num_actors, self.poll_s = len(moe.actors), poll_s
        self.known = set(ray._private.state.available_resources_per_node())
        self.requested: set[str] = set()  # the kinds asked for: "preemption", "grow"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="expertpar-watcher", daemon=True)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as err:  # a GCS hiccup: try again at the next poll  # noqa: BLE001
                log.debug("watcher: %r", err)

    def poll(self) -> None:
        draining = draining_nodes()
        if "preemption" not in self.requested and draining:
            ours = self.moe.nodes() | set(ray.get(self.signal.worker_nodes.remote(), timeout=10))
            hit = sorted(set(draining) & ours)
            if hit:
                deadlines = [draining[n] / 1000 - time.time() for n in hit if draining[n]]
                reason = (f"preemption notice for node{'s' if len(hit) > 1 else ''} "
                          f"{', '.join(hit)}" + (f" (reclaimed in {min(deadlines):.0f}s)"
                                                 if deadlines else ""))
                step = ray.get(self.signal.request.remote(reason, False), timeout=10)
                self.requested.add("preemption")
                log.warning("%s: the workers stop after step %d, write a checkpoint and the "
                            "job moves off", reason, step)
        ex = self.cfg.experts
        if "grow" in self.requested or not ex.elastic or self.num_actors >= ex.max_actors:
            return
        free = free_resources()
        joined = sorted(set(free) - self.known)
        if not joined:
            return
        self.known |= set(joined)
        room = fit_count(free, actor_shapes(self.cfg, ex.max_actors - self.num_actors,
                                            routers=False))
        if room:
            reason = (f"node{'s' if len(joined) > 1 else ''} {', '.join(joined)} joined: room "
                      f"for {min(ex.max_actors, self.num_actors + room)} expert actors "
                      f"(experts.num_actors {list(ex.num_actors)})")
            step = ray.get(self.signal.request.remote(reason, True), timeout=10)
            self.requested.add("grow")
            log.info("%s: the workers stop at the checkpoint of step %d and the experts are "
                     "re-placed", reason, step)

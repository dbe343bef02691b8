"""The expert actors of one drop-in MoE layer (``expertpar.SparseMoE``), driven from the
process that runs the user's model.

The trainer puts a router actor between its train workers and the expert actors. A drop-in
layer has one caller, so it routes where it runs (the ordinary ``MoELayer``, its gate an
ordinary parameter there) and its ``RemoteExperts`` calls the trainer's own ``ExpertActor``s,
as a train worker does with ``experts.transport: direct``: same placement, same wire, same
calls. The actors own the experts' weights, gradients and AdamW state, as in the trainer;
``step`` steps them and ``expert_tensors`` / ``load_experts`` carry a ``state_dict``.
"""
from __future__ import annotations

import logging
import math
import os

import ray
import torch

from ..config import MoEConfig, TrainConfig
from ..train.names import expert_file
from .actors import actor_threads, hide_gpus
from .calls import peer_for, wait_for
from .expert_actor import ExpertActor
from .placement import owner_table, place_experts
from .ray_start import check_token_auth, private_ray_dir
from .remote_experts import RemoteExperts
from .wire import Links, sweep_dead

log = logging.getLogger("expertpar")

LAYER = 0  # a drop-in layer is layer 0 of its own actors


def start_ray(address: str | None, num_cpus: float) -> bool:
    """Attach to the Ray this process runs, else to ``address`` (or ``RAY_ADDRESS``), else
    start an embedded local Ray with at least ``num_cpus`` logical CPUs, under the same
    security defaults as the trainer's (token authentication, a private token). Returns
    True when this call started or attached Ray."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    if address:
        ray.init(address=address, **quiet)
        return True
    check_token_auth()
    private_ray_dir()
    # Logical CPUs: the OS shares the cores; Ray only counts.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)),
             include_dashboard=False, **quiet)
    private_ray_dir()  # the token Ray has just made
    return True


class StandaloneExperts:
    """``num_actors`` expert actors hosting the E experts of one layer, and the
    ``RemoteExperts`` backend (``.backend``) that calls them from here."""

    def __init__(self, dim: int, moe: MoEConfig, seed: int, *, num_actors: int,
                 cpus_per_actor: float, gpus_per_actor: float, shared_memory: bool,
                 calls: str, timeout_s: float, start_timeout_s: float = 300.0):
        self.hosts = place_experts(1, moe.num_experts, num_actors)
        self.timeout_s = timeout_s
        self.links: Links | None = None
        self.peers: list = []
        gpus_in_cluster = bool(ray.cluster_resources().get("GPU", 0))
        actor_cls = ray.remote(ExpertActor).options(
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
            scheduling_strategy="SPREAD", **hide_gpus(gpus_per_actor, gpus_in_cluster))
        # The optimizer's hyperparameters come with every step (ExpertActor.step_as).
        self.actors = [actor_cls.remote(host, dim, moe, TrainConfig(), seed, None,
                                        shared_memory, calls == "socket")
                       for host in self.hosts]
        try:
            infos = self._started(start_timeout_s, cpus_per_actor, gpus_per_actor)
            wait_for([a.set_threads.remote(n) for a, n in zip(self.actors,
                                                                 actor_threads(infos, None))],
                     "the expert actors' threads", timeout_s)
            self.links = Links(shared_memory, "cpu")
            for a, (handle, (address, serves)) in enumerate(zip(
                    self.actors, wait_for([h.address.remote() for h in self.actors],
                                          "the expert actors' addresses", timeout_s))):
                self.peers.append((address, peer_for(handle, f"expert actor {a}", address,
                                                     serves, self.links.node, timeout_s)))
        except BaseException:
            self.close()
            raise
        peers = self.peers
        self.backend = RemoteExperts(LAYER, owner_table(self.hosts), self.links, lambda: peers,
                                     caller="worker")

    def _started(self, timeout_s: float, cpus: float, gpus: float) -> list[dict]:
        refs = [a.info.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            raise RuntimeError(f"SparseMoE: {len(refs) - len(ready)} of {len(refs)} expert "
                               f"actors ({cpus} CPU, {gpus} GPU each) did not start within "
                               f"{timeout_s:g}s; the cluster has {ray.cluster_resources()}, "
                               f"free {ray.available_resources()}")
        return ray.get(refs)

    def step(self, lr: float, betas: tuple[float, float], eps: float,
             weight_decay: float) -> None:
        wait_for([a.step_as.remote(lr, betas, eps, weight_decay) for a in self.actors],
                 "the expert actors' optimizer step", self.timeout_s)

    def zero_grad(self) -> None:
        wait_for([a.zero_grad.remote() for a in self.actors], "the expert actors' zero_grad",
                 self.timeout_s)

    def expert_tensors(self) -> dict[tuple[int, str], torch.Tensor]:
        """(expert, parameter name in its FFN) -> the parameter, from every actor (CPU)."""
        out = {}
        for part in wait_for([a.export.remote() for a in self.actors],
                             "the expert actors' parameters", self.timeout_s):
            for (L, e) in {s for host in self.hosts for s in host}:
                for key, t in part.get(expert_file(L, e), {}).items():
                    if "::" not in key:  # AdamW moments ride along in a checkpoint shard
                        out[(e, key)] = t
        return dict(sorted(out.items(), key=lambda item: item[0][0]))  # FFN order per expert

    def load_experts(self, tensors: dict[tuple[int, str], torch.Tensor], where: str) -> None:
        """Each actor takes its experts' parameters from ``tensors`` (as ``expert_tensors``
        gives them); every parameter of every expert must be there."""
        calls = []
        for handle, host in zip(self.actors, self.hosts):
            shards = {expert_file(L, e): {k: t.detach().cpu() for (x, k), t in tensors.items()
                                          if x == e} for L, e in host}
            calls.append(handle.load.remote(shards, where))
        wait_for(calls, "the expert actors' load", self.timeout_s)

    def close(self) -> None:
        """Stop the actors (each releases its shared buffers first) and this end's links."""
        for _, peer in self.peers:
            peer.close()
        if self.links is not None:
            self.links.close()
        actors, self.actors = getattr(self, "actors", []), []
        if not actors or not ray.is_initialized():
            return
        ray.wait([h.close.remote() for h in actors], num_returns=len(actors), timeout=10)
        for handle in actors:
            try:
                ray.kill(handle)
            except Exception as err:  # an actor that already died is fine  # noqa: BLE001
                log.debug("kill: %r", err)
        sweep_dead()

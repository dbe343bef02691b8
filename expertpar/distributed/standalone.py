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

import ray
import torch

from ..config import MoEConfig, TrainConfig
from ..train.names import expert_file
from .actors import actor_threads, hide_gpus, stop_actors
from .calls import peer_for, wait_for
from .expert_actor import ExpertActor
from .placement import owner_table, place_experts
from .remote_experts import RemoteExperts
from .wire import Links

LAYER = 0  # a drop-in layer is layer 0 of its own actors
KNOB = "RayExperts(call_timeout_s=...)"  # what sets a call's deadline, named when one misses


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
        self.infos: list[dict] = []  # per actor: its ExpertActor.info, once started
        self.closed = False
        gpus_in_cluster = bool(ray.cluster_resources().get("GPU", 0))
        actor_cls = ray.remote(ExpertActor).options(
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
            scheduling_strategy="SPREAD", **hide_gpus(gpus_per_actor, gpus_in_cluster))
        self.actors: list = []
        try:
            # The optimizer's hyperparameters come with every step (ExpertActor.step_as).
            for host in self.hosts:
                self.actors.append(actor_cls.remote(host, dim, moe, TrainConfig(), seed, None,
                                                    shared_memory, calls == "socket"))
            self.infos = self._started(start_timeout_s, cpus_per_actor, gpus_per_actor)
            threads = actor_threads(self.infos, None)
            self._wait([a.set_threads.remote(n) for a, n in zip(self.actors, threads)],
                       "the expert actors' threads")
            self.links = Links(shared_memory, "cpu")
            for a, (handle, (address, serves)) in enumerate(zip(
                    self.actors, self._wait([h.address.remote() for h in self.actors],
                                            "the expert actors' addresses"))):
                self.peers.append((address, peer_for(handle, f"expert actor {a}", address,
                                                     serves, self.links.node, timeout_s,
                                                     KNOB)))
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

    def _wait(self, refs: list, what: str) -> list:
        return wait_for(refs, what, self.timeout_s, KNOB)

    def _live(self) -> list:
        """The actors; refused once ``close`` has stopped them."""
        if self.closed:
            raise RuntimeError("SparseMoE: its expert actors were stopped by close()")
        return self.actors

    def step(self, lr: float, betas: tuple[float, float], eps: float,
             weight_decay: float) -> bool:
        """One AdamW step of every expert; False when their gradients were not finite, and so
        dropped without a step (as after a ``GradScaler`` step that skipped the optimizer)."""
        return all(self._wait([a.step_as.remote(lr, betas, eps, weight_decay)
                               for a in self._live()], "the expert actors' optimizer step"))

    def zero_grad(self) -> None:
        self._wait([a.zero_grad.remote() for a in self._live()], "the expert actors' zero_grad")

    def expert_tensors(self) -> dict[tuple[int, str], torch.Tensor]:
        """(expert, parameter name in its FFN) -> the parameter, from every actor (CPU)."""
        out = {}
        for part in self._wait([a.export.remote() for a in self._live()],
                               "the expert actors' parameters"):
            for (L, e) in {s for host in self.hosts for s in host}:
                for key, t in part.get(expert_file(L, e), {}).items():
                    if "::" not in key:  # AdamW moments ride along in a checkpoint shard
                        out[(e, key)] = t
        return dict(sorted(out.items(), key=lambda item: item[0][0]))  # FFN order per expert

    def load_experts(self, tensors: dict[tuple[int, str], torch.Tensor], where: str) -> None:
        """Each actor takes its experts' parameters from ``tensors`` (as ``expert_tensors``
        gives them); every parameter of every expert must be there."""
        calls = []
        for handle, host in zip(self._live(), self.hosts):
            shards = {expert_file(L, e): {k: t.detach().cpu() for (x, k), t in tensors.items()
                                          if x == e} for L, e in host}
            calls.append(handle.load.remote(shards, where))
        self._wait(calls, "the expert actors' load")

    def close(self) -> None:
        """Stop the actors (none leaves a shared buffer behind) and this end's links."""
        self.closed = True
        for _, peer in self.peers:
            peer.close()
        if self.links is not None:
            self.links.close()
        actors, self.actors = self.actors, []
        if actors and ray.is_initialized():
            stop_actors(actors, self.infos)

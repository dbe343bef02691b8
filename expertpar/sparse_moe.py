"""SparseMoE: the sparse MoE layer as a drop-in ``torch.nn.Module`` for any PyTorch model.

Shape legend: T tokens (every position of the input's leading dimensions), D model dim, E
experts.

``SparseMoE(num_experts, expert_size, activation, *, dim, ...)`` maps its arguments onto a
``MoEConfig`` and runs the trainer's own ``MoELayer``: gate, routing policy, capacity,
dispatch, experts, combine, auxiliary losses and routing statistics are that code, not a copy.
Every token is one modality (text), so the per-modality terms are those of a plain layer.
The output of a dropped token is zero: use the layer in a residual branch, ``x + moe(x)``.

In process (the default) the gate and the experts are ordinary parameters, trained by any
torch optimizer. With ``ray=RayExperts(...)`` the experts live in the trainer's expert
actors, which own their weights, gradients and AdamW state; the gate stays here. The actors
step whenever the torch optimizer that holds the gate steps, with that parameter group's
learning rate, betas, eps and weight decay (torch's optimizer step hooks), so a plain
training loop written for the in-process layer (forward, backward, AdamW step) trains the Ray
one unchanged. What works on ``model.parameters()`` in this process does not reach the
experts' gradients in the actors: gradient clipping, a ``GradScaler``'s unscaling and
inf check, ``zero_grad`` (a step clears them; ``zero_grad_experts`` drops them without one).
``state_dict`` and ``load_state_dict`` carry the experts' weights either way, under the same
names.
"""
from __future__ import annotations

import typing
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

from .config import ConfigError, MoEConfig, convert_value
from .moe.experts import FFN
from .moe.layer import MoELayer, RouteContext
from .moe.router import TEXT
from .moe.stats import RoutingStats

# SparseMoE's argument -> the MoEConfig field it sets (the others keep their names).
FIELD_OF = {"expert_size": "expert_hidden"}
EXPERTS_KEY = "layer.experts.experts."  # where the in-process layer keeps expert e's FFN
KINDS = {int: "an integer", float: "a finite number", bool: "True or False"}


@dataclass(frozen=True)
class RayExperts:
    """Where a ``SparseMoE``'s experts live on Ray: ``num_actors`` expert actors (at most one
    per expert), each reserving ``cpus_per_actor`` CPUs and ``gpus_per_actor`` of a GPU.
    Ray is the one this process runs; else the cluster at ``address`` (or ``RAY_ADDRESS``);
    else an embedded local Ray, started with token authentication, as the trainer starts it.
    ``calls``: "socket" (a Unix socket to same-node actors, ~50 us a call) or "ray";
    ``shared_memory``: same-node tensors through shared memory, else Ray's object store;
    ``call_timeout_s``: how long a call may wait before its actor counts as stuck."""
    num_actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: Optional[str] = None
    calls: str = "socket"
    shared_memory: bool = True
    call_timeout_s: float = 600.0

    def check(self, num_experts: int) -> list[tuple[str, str]]:
        bad = []
        if not (_is_int(self.num_actors) and 1 <= self.num_actors <= num_experts):
            bad.append(("num_actors", f"must be between 1 and num_experts ({num_experts}): "
                                      f"an actor hosts whole experts, and one with none "
                                      f"would idle"))
        if not (_is_number(self.cpus_per_actor) and self.cpus_per_actor >= 0):
            bad.append(("cpus_per_actor", "must be a number >= 0"))
        if not (_is_number(self.gpus_per_actor) and 0 <= self.gpus_per_actor <= 1):
            bad.append(("gpus_per_actor", "must be in [0, 1] (a share of one GPU)"))
        if self.calls not in ("socket", "ray"):
            bad.append(("calls", "must be 'socket' or 'ray'"))
        if not (_is_number(self.call_timeout_s) and self.call_timeout_s > 0):
            bad.append(("call_timeout_s", "must be a number > 0"))
        if not isinstance(self.shared_memory, bool):
            bad.append(("shared_memory", "must be True or False"))
        if not (self.address is None or isinstance(self.address, str)):
            bad.append(("address", "must be a Ray address (a string) or None"))
        return bad


@dataclass(frozen=True)
class MoEStats:
    """One forward's routing, detached. ``routing`` has every count (per modality: all of
    this layer's tokens are "text") and adds up over forwards with ``+``."""
    tokens: int
    tokens_per_expert: torch.Tensor  # (E,) rows each expert computed (kept assignments)
    load: torch.Tensor  # (E,) each expert's share of them (zeros when none was kept)
    # token choice: the share of top-k choices over capacity; expert choice: of tokens no
    # expert took (either way those tokens come out as zeros)
    drop_rate: float
    router_entropy: float  # mean entropy of a token's gate probabilities, nats (ln E: uniform)
    routing: RoutingStats = field(repr=False)

    @staticmethod
    def of(stats: RoutingStats) -> "MoEStats":
        kept_E = stats.kept_ME.sum(0)
        total = float(kept_E.sum())
        summary = stats.summary("moe")
        return MoEStats(int(stats.tokens_M.sum()), kept_E,
                        kept_E / total if total else torch.zeros_like(kept_E),
                        summary["moe/drop_rate"], summary["moe/router_entropy"], stats)


class SparseMoE(nn.Module):
    """A sparse Mixture-of-Experts FFN: input ``(..., dim)``, output the same shape.

    Each token goes to ``top_k`` of ``num_experts`` expert FFNs (dim -> expert_size ->
    dim, ``activation`` between), weighted by its gate probability. After each forward:
    ``aux_loss`` (a differentiable scalar: add it to your loss), ``aux`` (each unweighted
    auxiliary term, detached) and ``stats`` (``MoEStats``). ``dim`` is required, as
    ``nn.Linear``'s sizes are: the parameters exist from construction, so an optimizer built
    right after sees them. ``seed`` fixes the gate's and experts' initialisation (None: one
    draw from torch's global generator). ``ray=RayExperts(...)`` puts the experts in Ray
    expert actors; ``close()`` stops them. The other arguments are ``model.moe``'s keys (see
    the README's configuration reference); bad values are refused naming the argument.
    """

    def __init__(self, num_experts: int, expert_size: int, activation: str = "gelu", *,
                 dim: int, top_k: int = 1, temperature: float = 1.0,
                 capacity_factor: float = 1.25, eval_capacity_factor: float = 2.0,
                 dropless: bool = False, routing: str = "token_choice",
                 renormalize: bool = True, noise_std: float = 0.0,
                 drop_policy: str = "probability", load_balance_weight: float = 0.01,
                 z_loss_weight: float = 0.001, local_entropy_weight: float = 0.05,
                 global_entropy_weight: float = 0.10, expert_precision: str = "float32",
                 seed: Optional[int] = None, ray: Optional[RayExperts] = None):
        super().__init__()
        # Every other argument is named as the MoEConfig field it sets (FIELD_OF renames the
        # exceptions), so the config is built from locals() by name: an argument added here
        # reaches MoEConfig (and its checks) without a second list to keep in step.
        args = {k: v for k, v in locals().items()
                if k not in ("self", "__class__", "dim", "seed", "ray")}
        self.cfg = moe_config(args)
        if not (_is_int(dim) and dim >= 1):
            raise ValueError(f"SparseMoE: dim={dim!r} must be a positive integer")
        if not (seed is None or _is_int(seed) and 0 <= seed < 2**32):
            raise ValueError(f"SparseMoE: seed={seed!r} must be an integer in [0, 2**32) or "
                             f"None")
        if ray is not None and not isinstance(ray, RayExperts):
            raise ValueError(f"SparseMoE: ray={ray!r} must be a RayExperts(...) or None")
        for key, why in ray.check(num_experts) if ray is not None else ():
            raise ValueError(f"SparseMoE: ray=RayExperts({key}={getattr(ray, key)!r}) {why}")
        self.dim = dim
        self.seed = int(torch.randint(0, 2**32, ()).item()) if seed is None else seed
        self.ray = ray
        self._forwards = 0  # training forwards so far: the gate noise's step
        self.aux_loss: torch.Tensor | None = None
        self.aux: dict[str, torch.Tensor] = {}
        self.stats: MoEStats | None = None
        self._experts = None
        if ray is not None:
            self._experts, leave_ray = _start_experts(dim, self.cfg, self.seed, ray)
            self._optimizer_hooks: list = []  # removed when the actors stop
            # From here on the actors (and a Ray started for them) go with the layer, or
            # with close(), or with a failure below.
            self._release = weakref.finalize(self, _release, self._optimizer_hooks,
                                             self._experts, leave_ray)
        try:
            # The layer seeds itself; forked, so that the global generator's stream (which
            # initialises the user's other modules) is the same in process and on Ray.
            with torch.random.fork_rng(devices=[]):
                self.layer = MoELayer(dim, self.cfg, 0, seed=self.seed,
                                      experts=None if ray is None else self._experts.backend)
            if ray is not None:
                self._calls = 0  # names each forward's activations in the actors
                me = weakref.ref(self)
                self._optimizer_hooks += [
                    register_optimizer_step_pre_hook(partial(_before_optimizer_step, me)),
                    register_optimizer_step_post_hook(partial(_after_optimizer_step, me))]
                self.register_state_dict_post_hook(_add_expert_tensors)
                self.register_load_state_dict_pre_hook(_load_expert_tensors)
        except BaseException:
            self.close()
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"SparseMoE: input of shape {tuple(x.shape)}; its last dimension "
                             f"must be dim={self.dim}")
        x_TD = x.reshape(-1, self.dim)  # (..., D) -> (T, D)
        if self._experts is not None:
            if not self._release.alive:
                raise RuntimeError("SparseMoE: its expert actors were stopped by close()")
            self._experts.backend.call_key = f"f{self._calls}"
            self._calls += 1
            if torch.is_grad_enabled() and not x_TD.requires_grad:
                # The actors keep a forward's activations, and so give the experts gradients,
                # only for an input that needs a gradient (the trainer's always does).
                x_TD = x_TD.detach().requires_grad_()
        modality_T = torch.full((x_TD.shape[0],), TEXT, dtype=torch.long, device=x.device)
        out = self.layer(x_TD, modality_T, RouteContext(self.seed, self._forwards))
        if self.training:
            self._forwards += 1
        self.aux_loss = out.aux_loss
        self.aux = {k.removesuffix("/text"): v for k, v in out.aux.items()}
        self.stats = MoEStats.of(out.stats)
        return out.y_TD.reshape(x.shape)  # (T, D) -> (..., D)

    def step_experts(self, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, weight_decay: float = 0.01) -> bool:
        """Ray only: one AdamW step of the experts in their actors (what happens by itself
        when the optimizer holding the gate steps), then their gradients are cleared.
        Gradients that are not finite are dropped without a step (a warning; False): those
        of a step a ``GradScaler`` skipped stay in the actors and add to the next step's."""
        if self._experts is None:
            raise RuntimeError("SparseMoE.step_experts: the experts are in this process, "
                               "ordinary parameters that your optimizer steps")
        stepped = self._experts.step(float(lr), (float(betas[0]), float(betas[1])),
                                     float(eps), float(weight_decay))
        if not stepped:
            warnings.warn("SparseMoE: the experts' gradients were not finite (inf or NaN): "
                          "dropped, the experts did not step", RuntimeWarning, stacklevel=2)
        return stepped

    def zero_grad_experts(self) -> None:
        """Ray only: drop the experts' gradients (and kept activations) in their actors
        without a step; in process, ``zero_grad`` does it."""
        if self._experts is not None:
            self._experts.zero_grad()

    def close(self) -> None:
        """Stop the expert actors (Ray); the layer cannot run after this. Nothing in process."""
        if self._experts is not None:
            self._release()

    def extra_repr(self) -> str:
        c = self.cfg
        where = "in process" if self.ray is None else f"ray={self.ray}"
        return (f"num_experts={c.num_experts}, expert_size={c.expert_hidden}, "
                f"activation={c.activation!r}, dim={self.dim}, top_k={c.top_k}, "
                f"routing={c.routing!r}, {where}")


def moe_config(args: dict) -> MoEConfig:
    """The MoEConfig of SparseMoE's arguments; a bad value is refused naming its argument
    (type and choices as the config loader checks them, then ``MoEConfig.check``)."""
    hints = typing.get_type_hints(MoEConfig)
    values = {}
    for arg, value in args.items():
        key = FIELD_OF.get(arg, arg)
        try:
            values[key] = convert_value(hints[key], value, arg)
        except ConfigError:
            tp = hints[key]
            literal = typing.get_origin(tp) is typing.Literal
            kind = f"one of {list(typing.get_args(tp))}" if literal else KINDS.get(tp, str(tp))
            raise ValueError(f"SparseMoE: {arg}={value!r} is not {kind}") from None
    cfg = MoEConfig(every=1, **values)
    arg_of = {v: k for k, v in FIELD_OF.items()}
    problems = [f"{arg_of.get(key, key)}={args[arg_of.get(key, key)]!r} "
                f"{why.replace('model.moe.', '')}" for key, why in cfg.check()]
    if problems:
        raise ValueError(f"SparseMoE: {'; '.join(problems)}")
    return cfg


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _start_experts(dim: int, cfg: MoEConfig, seed: int, ray: RayExperts):
    """The layer's expert actors, and what to call once they are stopped (a Ray started for
    them goes with the last layer on it)."""
    from .distributed.ray_start import start_ray
    from .distributed.standalone import StandaloneExperts
    leave_ray = start_ray(ray.address, ray.num_actors * ray.cpus_per_actor + 1)
    try:
        return StandaloneExperts(dim, cfg, seed, num_actors=ray.num_actors,
                                 cpus_per_actor=ray.cpus_per_actor,
                                 gpus_per_actor=ray.gpus_per_actor,
                                 shared_memory=ray.shared_memory, calls=ray.calls,
                                 timeout_s=ray.call_timeout_s), leave_ray
    except BaseException:
        leave_ray()
        raise


def _release(hooks: list, experts, leave_ray) -> None:
    for hook in hooks:
        hook.remove()
    try:
        experts.close()
    finally:
        leave_ray()


# ---------------------------------------------------------------- Ray: the optimizer's step


def _before_optimizer_step(ref, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """torch calls this before every optimizer's step: an optimizer that holds this layer's
    gate and is not AdamW is refused before it changes anything."""
    group = _gate_group(ref(), optimizer)
    if group is not None:
        adamw_hyperparameters(optimizer, group)


def _after_optimizer_step(ref, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """torch calls this after every optimizer's step: the optimizer that holds this layer's
    gate steps its experts too, with the gate's parameter group's hyperparameters."""
    moe = ref()
    group = _gate_group(moe, optimizer)
    if group is not None:
        moe.step_experts(**adamw_hyperparameters(optimizer, group))


def _gate_group(moe: SparseMoE | None, optimizer: torch.optim.Optimizer) -> dict | None:
    """The parameter group of ``optimizer`` that holds ``moe``'s gate, if any."""
    if moe is None or moe._experts is None:
        return None
    gate = moe.layer.gate.w_ED
    return next((g for g in optimizer.param_groups if any(p is gate for p in g["params"])),
                None)


def adamw_hyperparameters(optimizer: torch.optim.Optimizer, group: dict) -> dict:
    """lr, betas, eps and weight_decay of ``group``, for the experts' AdamW in their actors.
    An optimizer that is not AdamW (nor Adam without weight decay) is refused: the experts
    would silently be trained differently from the rest."""
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    decoupled = (isinstance(optimizer, torch.optim.AdamW)
                 or group.get("decoupled_weight_decay", False))
    if (not adam or (group["weight_decay"] and not decoupled) or group.get("amsgrad")
            or group.get("maximize")):
        raise TypeError(f"SparseMoE(ray=...): the experts in Ray actors are stepped by AdamW "
                        f"following the optimizer that holds the gate, which is "
                        f"{type(optimizer).__name__} ({_describe(group)}); use torch.optim."
                        f"AdamW (or Adam without weight decay, amsgrad or maximize), or keep "
                        f"the gate out of it and call moe.step_experts(...) yourself")
    lr = group["lr"]
    return {"lr": float(lr), "betas": tuple(float(b) for b in group["betas"]),
            "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}


def _describe(group: dict) -> str:
    return ", ".join(f"{k}={group[k]!r}" for k in ("lr", "weight_decay", "amsgrad", "maximize")
                     if k in group)


# ---------------------------------------------------------------- Ray: state_dict


def _add_expert_tensors(module: SparseMoE, state_dict: dict, prefix: str,
                        local_metadata) -> None:
    """The experts' weights, fetched from their actors, under the in-process names."""
    for (e, name), t in module._experts.expert_tensors().items():
        state_dict[f"{prefix}{EXPERTS_KEY}{e}.{name}"] = t


def _load_expert_tensors(module: SparseMoE, state_dict: dict, prefix: str, local_metadata,
                         strict: bool, missing_keys: list, unexpected_keys: list,
                         error_msgs: list) -> None:
    """Take the experts' weights out of ``state_dict`` and send them to their actors. As
    torch loads a module, what is there loads (with strict=False, or before strict raises):
    a missing or misshapen expert parameter keeps its value, and is reported."""
    head = prefix + EXPERTS_KEY
    mine = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(head)]}
    with torch.device("meta"):  # the names and shapes of an expert's parameters, no memory
        ffn = FFN(module.dim, module.cfg.expert_hidden)
    wanted = {(e, name): (f"{head}{e}.{name}", tuple(p.shape))
              for e in range(module.cfg.num_experts) for name, p in ffn.named_parameters()}
    keys = {k for k, _ in wanted.values()}
    unexpected_keys.extend(k for k in mine if k not in keys)
    missing = [k for k in sorted(keys) if k not in mine]
    missing_keys.extend(missing)
    bad = [f"size mismatch for {k}: copying a param with shape {tuple(mine[k].shape)}, the "
           f"expert has {shape}" for k, shape in wanted.values()
           if k in mine and tuple(mine[k].shape) != shape]
    error_msgs.extend(bad)
    present = {key: mine[k] for key, (k, shape) in wanted.items()
               if k in mine and tuple(mine[k].shape) == shape}
    if not present:
        return
    if len(present) < len(wanted):  # an actor loads whole experts: the rest as they are
        present = {**module._experts.expert_tensors(), **present}
    module._experts.load_experts(present, where="load_state_dict")


__all__ = ["SparseMoE", "RayExperts", "MoEStats"]

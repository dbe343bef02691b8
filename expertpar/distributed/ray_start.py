"""Starting Ray in this process with the security defaults: token authentication, a private
token. The Ray job's driver (app/ray_job.py's ``ray_init``) and a drop-in layer's experts
(``start_ray``, below) start an embedded Ray only through ``start_embedded``.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable

import ray


def start_embedded(**init_kwargs) -> None:
    """Start an embedded local Ray (``ray.init(address="local", **init_kwargs)``): refused
    without token authentication, and ~/.ray and the token Ray makes kept to this user."""
    check_token_auth()
    private_ray_dir()
    ray.init(address="local", **init_kwargs)
    private_ray_dir()  # the token Ray has just made


def check_token_auth() -> None:
    """Refuse to start a Ray without token authentication: Ray's own ports (GCS, raylet,
    object manager) listen on every interface, and the token is what guards them."""
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode.lower() != "token":
        raise ValueError(f"RAY_AUTH_MODE={mode}: an embedded Ray would run without token "
                         f"authentication, and Ray's own ports (GCS, raylet, object "
                         f"manager) listen on every interface; unset RAY_AUTH_MODE or set "
                         f"it to token")


def private_ray_dir() -> None:
    """Ray 2.60 writes the token it makes for a local cluster to ~/.ray/auth_token with the
    umask's mode (0644, in a 0755 ~/.ray): keep both to this user."""
    ray_dir = Path.home() / ".ray"
    ray_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ray_dir.chmod(0o700)
    token = ray_dir / "auth_token"
    if token.exists():
        token.chmod(0o600)


# ---------------------------------------------------------------- a drop-in layer's Ray


class _StartedRay:
    """The Ray that ``start_ray`` started in this process, and how many drop-in layers use
    it: the last one to leave shuts it down."""
    current: _StartedRay | None = None

    def __init__(self):
        self.layers = 0

    def join(self) -> Callable[[], None]:
        self.layers += 1
        return self.leave

    def leave(self) -> None:
        self.layers -= 1
        if self.layers == 0 and _StartedRay.current is self:
            _StartedRay.current = None
            if ray.is_initialized():
                ray.shutdown()


def start_ray(address: str | None, num_cpus: float) -> Callable[[], None]:
    """A drop-in layer's Ray: the one this process runs, else the cluster at ``address`` (or
    ``RAY_ADDRESS``), else an embedded local Ray with at least ``num_cpus`` logical CPUs,
    under the trainer's security defaults. Returns what the layer calls when it closes: the
    last layer to close on a Ray started here shuts it down; one this process had started
    otherwise stays up."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
        if address:
            ray.init(address=address, **quiet)
        else:
            # Logical CPUs: the OS shares the cores; Ray only counts.
            start_embedded(num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)),
                           include_dashboard=False, **quiet)
        _StartedRay.current = _StartedRay()
    started = _StartedRay.current
    return started.join() if started is not None else _stays_up


def _stays_up() -> None:
    """A layer leaving a Ray that this module did not start."""

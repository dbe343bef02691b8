"""Starting Ray in this process with the security defaults: token authentication, a private
token. The Ray job's driver (app/ray_job.py) and a drop-in layer's experts (standalone.py)
start an embedded Ray only through here.
"""
from __future__ import annotations

import os
from pathlib import Path


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

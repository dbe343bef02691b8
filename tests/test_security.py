"""Security defaults of the Ray driver (app/ray_job.py's ``ray_init``), without starting Ray:
what it asks ``ray.init`` for is captured."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import tiny_config
from expertpar.app import ray_job

SECRETS = {"AWS_SECRET_ACCESS_KEY": "canary-aws-secret", "AWS_SESSION_TOKEN": "canary-session",
           "EXPERTPAR_S3_PASSWORD": "canary-password"}


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """ray.init replaced by a recorder that, like Ray 2.60 starting a local cluster, writes a
    new token to ~/.ray/auth_token with the umask's mode."""
    import ray
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    up = []  # non-empty while the fake Ray is up

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs.get("address") == "local":
            token = Path.home() / ".ray" / "auth_token"
            token.parent.mkdir(exist_ok=True)
            token.write_text("0123456789abcdef")
        up.append(True)

    monkeypatch.setattr(ray, "is_initialized", lambda: bool(up))
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", up.clear)
    return calls


def _cfg(synth_dir, tmp_path, **over):
    return tiny_config(synth_dir, tmp_path, **{"distributed.backend": "ray", **over})


def test_an_embedded_rays_dashboard_listens_on_localhost(synth_dir, tmp_path, captured):
    assert ray_job.ray_init(_cfg(synth_dir, tmp_path))
    (kwargs,) = captured
    assert kwargs["address"] == "local" and kwargs["dashboard_host"] == "127.0.0.1"


@pytest.mark.parametrize("address", [None, "auto"], ids=["embedded", "attached"])
def test_no_secret_travels_in_the_runtime_environment(synth_dir, tmp_path, captured,
                                                      monkeypatch, address):
    # Ray writes a job's runtime environment, env_vars included, to runtime_env_agent.log.
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    ray_job.ray_init(_cfg(synth_dir, tmp_path, **({"distributed.address": address}
                                                   if address else {})))
    (kwargs,) = captured
    assert not [v for v in SECRETS.values() if v in repr(kwargs)], kwargs


def test_an_embedded_ray_without_token_authentication_is_refused(synth_dir, tmp_path, captured,
                                                                 monkeypatch):
    # Ray's own ports (GCS, raylet, object manager, workers) listen on every interface.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ValueError, match="RAY_AUTH_MODE"):
        ray_job.ray_init(_cfg(synth_dir, tmp_path))
    assert captured == []


def test_the_token_an_embedded_ray_makes_is_this_users_alone(synth_dir, tmp_path, captured):
    old = os.umask(0o022)
    try:
        ray_job.ray_init(_cfg(synth_dir, tmp_path))
    finally:
        os.umask(old)
    token = Path.home() / ".ray" / "auth_token"
    dir_mode, file_mode = (stat.S_IMODE(p.stat().st_mode) for p in (token.parent, token))
    assert not dir_mode & 0o077 and not file_mode & 0o077, (oct(dir_mode), oct(file_mode))


def test_a_drop_in_layers_embedded_ray_keeps_the_same_defaults(captured, monkeypatch):
    """SparseMoE(ray=RayExperts(...)) in a process without Ray starts one through
    distributed/ray_start.py: token authentication, a private token, no dashboard. The last
    layer on it to close (or to fail starting its actors) shuts it down; a Ray the process
    had started stays up."""
    import ray

    from expertpar import RayExperts, SparseMoE
    from expertpar.distributed import standalone

    class Experts:  # the expert actors, not started
        def __init__(self, *args, **kwargs):
            self.backend = object()

        def close(self):
            pass

    monkeypatch.setattr(standalone, "StandaloneExperts", Experts)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ValueError, match="RAY_AUTH_MODE"):
        SparseMoE(4, 8, dim=4, ray=RayExperts(num_actors=2))
    assert captured == [] and not ray.is_initialized()
    monkeypatch.delenv("RAY_AUTH_MODE")
    old = os.umask(0o022)
    try:
        layers = [SparseMoE(4, 8, dim=4, ray=RayExperts(num_actors=2)) for _ in range(2)]
    finally:
        os.umask(old)
    (kwargs,) = captured  # the first layer started it; the second runs on it
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False
    assert kwargs["num_cpus"] >= 3
    token = Path.home() / ".ray" / "auth_token"
    assert not stat.S_IMODE(token.stat().st_mode) & 0o077
    assert not stat.S_IMODE(token.parent.stat().st_mode) & 0o077
    layers[0].close()
    assert ray.is_initialized()
    layers[1].close()
    assert not ray.is_initialized()
    ray.init(address="local")  # the user's own Ray
    SparseMoE(4, 8, dim=4, ray=RayExperts(num_actors=2)).close()
    assert ray.is_initialized()
    ray.shutdown()

    def fail(*args, **kwargs):
        raise RuntimeError("the actors did not start")
    monkeypatch.setattr(standalone, "StandaloneExperts", fail)
    with pytest.raises(RuntimeError, match="did not start"):
        SparseMoE(4, 8, dim=4, ray=RayExperts(num_actors=2))
    assert not ray.is_initialized()  # a failed layer takes the Ray it started with it

"""Shared fixtures: small synthetic datasets and configs, made once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from expertpar.config import config_from_dict
from expertpar.data import write_synthetic


@pytest.fixture(scope="session", autouse=True)
def home_in_a_temporary_directory(tmp_path_factory):
    """Tests never write into the real home: Ray 2.60 writes ~/.ray/auth_token on ray.init."""
    # ... nor into /dev/shm: the expert actors' shared-memory buffers go to a temporary
    # directory too (Ray's workers inherit the variable).
    real = {k: os.environ.get(k) for k in ("HOME", "EXPERTPAR_SHM_DIR")}
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))
    os.environ["EXPERTPAR_SHM_DIR"] = str(tmp_path_factory.mktemp("shm"))
    yield Path(os.environ["HOME"])
    for key, value in real.items():
        if value is None:
            del os.environ[key]
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """1,600 training and 400 held-out coloured-shapes pairs (16 classes)."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_train=1600, n_test=400, seed=0)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (8 logical CPUs: workers, actors and Ray Data fit)."""
    import ray
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


def tiny_config(data_dir, run_dir, **overrides):
    """A model small enough for CPU tests; ``overrides`` are dotted keys -> values."""
    tree = {
        "run": {"name": "tiny", "out_dir": str(run_dir), "seed": 0},
        "data": {"train": str(data_dir / "train"), "eval": str(data_dir / "test")},
        "tokenizer": {"vocab_size": 128, "context_length": 12},
        "model": {"dim": 32, "depth": 2, "heads": 2, "ffn_hidden": 64, "embed_dim": 32,
                  "patch_size": 8,
                  "moe": {"num_experts": 4, "top_k": 1, "every": 2, "expert_hidden": 64}},
        "train": {"steps": 20, "batch_size": 32, "lr": 0.003, "warmup_steps": 5,
                  "log_every": 5, "eval_every": 0, "checkpoint_every": 10},
        "eval": {"batch_size": 200},
    }
    return config_from_dict(tree, [f"{k}={v}" for k, v in overrides.items()])


def pytest_collection_modifyitems(config, items):
    """Say why GPU tests do not run here, once per test, in the skip reason."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

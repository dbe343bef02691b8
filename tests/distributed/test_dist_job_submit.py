"""`ray start --head` then `ray job submit` of a short expertpar job, with token auth on.

The test starts its own head node on 127.0.0.1 (own ports, own temp dir, own process group)
and stops it, whatever happens.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from expertpar.config import dump_config

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="/tmp/eph")  # short: Ray's socket paths have a limit
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # A fresh machine has no token yet: make one (kept if it exists), as a user would.
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True)
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=6",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ok = subprocess.run([RAY, "job", "list", "--address", url], env=env,
                                capture_output=True, text=True)
            if ok.returncode == 0:
                break
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited: {proc.stdout.read()}")
            time.sleep(2)
        else:
            pytest.fail(f"the head's job server at {url} did not come up: {ok.stderr[-2000:]}")
        yield url, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_training_job(head_node, synth_dir, tmp_path):
    url, env = head_node
    workdir = tmp_path / "job"
    workdir.mkdir()
    cfg = tiny_config(synth_dir, tmp_path / "runs", **{
        "distributed.backend": "ray", "experts.num_actors": 2, "experts.cpus_per_actor": 0.5,
        "train.steps": 4, "train.log_every": 2})
    (workdir / "job.yaml").write_text(dump_config(cfg))
    out = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", str(workdir), "--",
         sys.executable, "-m", "expertpar", "train", "job.yaml"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout.lower(), out.stdout[-4000:]
    assert "step      4/4" in out.stdout
    topo = json.loads((cfg.run_dir / "ray_topology.json").read_text())
    assert len(topo["expert_actors"]) == 2
    assert (cfg.run_dir / "checkpoints" / "latest").read_text().strip() == "step_000004"


def test_job_submit_without_the_token_is_refused(head_node):
    url, env = head_node
    no_token = {**env, "RAY_AUTH_TOKEN_PATH": "/nonexistent/token", "HOME": "/nonexistent"}
    out = subprocess.run([RAY, "job", "list", "--address", url], env=no_token,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "token" in (out.stdout + out.stderr).lower()

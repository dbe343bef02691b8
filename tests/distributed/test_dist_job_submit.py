"""`ray start --head` then `ray job submit` of a short expertpar job, with token auth on.

The test starts its own head node on 127.0.0.1 (own ports, own temp dir, own process group)
and stops it, whatever happens. Nothing touches the real home directory: every Ray command the
test runs (`ray get-auth-token`, `ray start`, `ray job ...`) gets a temporary HOME, so the token
is made in <tmp home>/.ray/auth_token, and RAY_AUTH_TOKEN_PATH names that file (Ray 2.60's
token loader reads RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then $HOME/.ray/auth_token;
`ray get-auth-token --generate` writes to $HOME/.ray/auth_token).

The head is stopped by signalling its own process group (it runs with --block in a new session),
not with `ray stop`, which kills every Ray process of this user on the machine (it matches
processes by name), including Ray clusters of other test runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
AUTH_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Ray 2.60's messages (ray/_private/authentication/*, ray._raylet's token loader):
# - a client in token mode without a token stops before sending anything: "Token authentication
#   is enabled but Ray couldn't find an authentication token. ...";
# - a client not in token mode sends no token; the job server answers 401 "Unauthorized: Missing
#   authentication token" and the client adds "... no authentication token was found".
MISSING = {"token": ["couldn't find an authentication token"],
           None: ["missing authentication token", "no authentication token was found"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_token_state():
    """The real home's token file: None, or (mtime, SHA-256) — it must not change."""
    path = Path(os.environ.get("HOME", "~")).expanduser() / ".ray" / "auth_token"
    if not path.exists():
        return None
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def pids_with_home(home: Path) -> list[int]:
    """Processes whose environment has HOME=<home>: only what this test's head started."""
    marker = f"HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@dataclass
class Head:
    url: str
    env: dict  # for every Ray command of the test: temp HOME, token mode, the token's path
    home: Path
    token: str
    real_token_before: object
    temp_dir: Path  # Ray's session files: its logs, the jobs' driver logs, uploaded packages


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    real_before = real_token_state()
    home = tmp_path_factory.mktemp("home")
    temp_dir = tempfile.mkdtemp(prefix="/tmp/eph")  # short: Ray's socket paths have a limit
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    # As from an activated virtualenv: `expertpar` and `ray` are on the PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # A fresh machine has no token yet: make one, as a user would, in the temporary home.
    made = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True,
                          capture_output=True, text=True, timeout=120)
    token_file = home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert token and made.stdout.strip() == token
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
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
                                capture_output=True, text=True, timeout=120)
            if ok.returncode == 0:
                break
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited: {proc.stdout.read()}")
            time.sleep(2)
        else:
            pytest.fail(f"the head's job server at {url} did not come up: {ok.stderr[-2000:]}")
        yield Head(url, env, home, token, real_before, Path(temp_dir))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        # Anything of this head that left the process group (workers, the job's driver):
        # found by the temporary HOME it inherited, ended by pid.
        deadline = time.time() + 10
        while (left := pids_with_home(home)) and time.time() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_ids(head: Head) -> str:
    out = subprocess.run([RAY, "job", "list", "--address", head.url], env=head.env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("client_mode", ["token", None], ids=["auth-mode-token", "no-auth-mode"])
def test_job_submit_without_the_token_is_refused(head_node, tmp_path, client_mode):
    head = head_node
    # A client that has no token anywhere: no RAY_AUTH_TOKEN(_PATH), an empty HOME; either set
    # up for token mode (as the README says: it refuses to send) or not at all (it sends, and
    # the head refuses). Either way no job gets in.
    empty_home = tmp_path / "home-without-token"
    empty_home.mkdir()
    env = {k: v for k, v in head.env.items() if k not in AUTH_VARS}
    env["HOME"] = str(empty_home)
    if client_mode:
        env["RAY_AUTH_MODE"] = client_mode
    marker = tmp_path / "the-job-ran"
    submission_id = f"refused-{uuid.uuid4().hex[:12]}"
    out = subprocess.run(
        [RAY, "job", "submit", "--address", head.url, "--submission-id", submission_id,
         "--no-wait", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"],
        env=env, capture_output=True, text=True, timeout=120)
    said = (out.stdout + out.stderr).lower()
    assert out.returncode != 0, said[-3000:]
    for words in MISSING[client_mode]:  # the error says the token is missing
        assert words in said, said[-3000:]
    assert not (empty_home / ".ray" / "auth_token").exists()  # submitting made no token
    # The head did not accept it: no such job, and its entrypoint never ran.
    assert submission_id not in job_ids(head)
    assert not marker.exists()
    assert real_token_state() == head.real_token_before, "the real ~/.ray/auth_token changed"


def test_job_submit_with_a_wrong_token_is_refused(head_node, tmp_path):
    head = head_node
    wrong = tmp_path / "wrong_token"
    wrong.write_text(uuid.uuid4().hex)
    assert wrong.read_text() != head.token
    env = {**head.env, "RAY_AUTH_TOKEN_PATH": str(wrong)}
    submission_id = f"wrong-{uuid.uuid4().hex[:12]}"
    out = subprocess.run(
        [RAY, "job", "submit", "--address", head.url, "--submission-id", submission_id,
         "--no-wait", "--", sys.executable, "-c", "pass"],
        env=env, capture_output=True, text=True, timeout=120)
    said = (out.stdout + out.stderr).lower()
    assert out.returncode != 0, said[-3000:]
    assert "invalid authentication token" in said, said[-3000:]
    assert submission_id not in job_ids(head)


def readme_submit_command() -> str:
    """The `ray job submit` command of README.md, joined into one line."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("RAY_AUTH_MODE=token ray job submit")
    block = readme[start:readme.index("```", start)]
    return " ".join(line.strip().rstrip("\\").strip() for line in block.splitlines()
                    if line.strip())


def test_the_readme_submit_command_works_as_written_on_a_fresh_clone(head_node, tmp_path):
    head = head_node
    repo = Path(__file__).resolve().parents[2]
    clone = tmp_path / "clone"
    # A fresh clone: the files git tracks, nothing it ignores (no data/, no runs/, no .venv).
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        if (repo / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, clone / rel)
    # What `make demo` made before it (smaller, same place).
    from expertpar.data import write_synthetic
    write_synthetic(clone / "data" / "synth", n_train=256, n_test=64, seed=0)
    command = readme_submit_command()
    assert "$PWD/data/synth/train" in command and "$PWD/runs" in command, command
    command = command.replace("http://127.0.0.1:8265", head.url)
    # Shorter than the quickstart's 600 steps; everything else as written.
    command += " --set train.steps=2 --set train.eval_every=0"
    out = subprocess.run(["bash", "-c", command], cwd=clone, env=head.env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout.lower(), out.stdout[-4000:]
    run_dir = clone / "runs" / "quickstart"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 2
    # The job ran the quickstart's MoE side on the head: 2 expert actors and a router.
    topo = json.loads((run_dir / "ray_topology.json").read_text())
    assert len(topo["expert_actors"]) == 2 and len(topo["routers"]) == 1
    assert real_token_state() == head.real_token_before, "the real ~/.ray/auth_token changed"
    # The token appears nowhere the job wrote: not in its output and logs, not in any file of
    # the run directory (metrics, config, checkpoints, topology).
    assert head.token not in out.stdout + out.stderr
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and head.token.encode() in
              p.read_bytes()]
    assert not leaked, leaked
    # ... nor in any file of Ray's session: its logs and the job's driver log.
    ray_files = [p for p in head.temp_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.startswith("job-driver-") for p in ray_files), ray_files[:20]
    leaked = [p for p in ray_files if head.token.encode() in p.read_bytes()]
    assert not leaked, leaked

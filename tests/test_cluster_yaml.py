"""cluster.yaml (Ray cluster launcher) and jobs/*.yaml: valid for the installed Ray and expertpar.

The launcher config is checked the way `ray up` checks it, offline: Ray's own defaults are merged
in (``prepare_config``) and the result goes through Ray's validator (``validate_config``, which
applies the JSON schema shipped in the ray package, ``ray/autoscaler/ray-schema.json``). The raw
file is also checked against that schema, so a bad key cannot hide behind a default. Nothing here
reaches AWS or any machine. The on-premise variant, kept commented out at the end of cluster.yaml,
is extracted and checked the same way.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from expertpar.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
ONPREM_BEGIN = "# >>> on-premise (provider: local) >>>"
ONPREM_END = "# <<< on-premise <<<"
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-gpu$")
SHARED_DIR = "/mnt/cluster_storage"
# vCPUs and GPUs of the instance types a worker node type may declare resources for.
AWS_INSTANCE_RESOURCES = {
    "g5.xlarge": {"CPU": 4, "GPU": 1},
    "g5.2xlarge": {"CPU": 8, "GPU": 1},
    "g5.4xlarge": {"CPU": 16, "GPU": 1},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
    "g5.48xlarge": {"CPU": 192, "GPU": 8},
}


def ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def onprem_text(text: str) -> str:
    """The commented-out on-premise config between the markers, uncommented."""
    lines = text.splitlines()
    assert lines.count(ONPREM_BEGIN) == 1 and lines.count(ONPREM_END) == 1, \
        "cluster.yaml needs exactly one on-premise BEGIN and one END marker line"
    begin, end = lines.index(ONPREM_BEGIN), lines.index(ONPREM_END)
    assert begin < end
    out = []
    for n, line in enumerate(lines[begin + 1:end], start=begin + 2):
        assert line.startswith("#"), f"cluster.yaml:{n}: on-premise block line is not commented"
        out.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(out) + "\n"


def load_aws() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def load_onprem() -> dict:
    return yaml.safe_load(onprem_text(CLUSTER_YAML.read_text()))


def ray_check(config: dict) -> dict:
    """What `ray up` does before it contacts a provider: schema on the file, defaults, validator."""
    jsonschema.validate(config, ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


CONFIGS = {"aws": load_aws, "onprem": load_onprem}


@pytest.fixture(params=sorted(CONFIGS))
def config(request) -> dict:
    return CONFIGS[request.param]()


def start_lines(commands: list[str]) -> list[str]:
    return [c for c in commands if "ray start" in c]


# ---------------------------------------------------------------- Ray's own validation


def test_valid_for_the_ray_launcher(config):
    prepared = ray_check(config)
    assert prepared["cluster_name"].startswith("expertpar")
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_provider():
    cfg = load_aws()
    assert cfg["cluster_name"] == "expertpar"
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"]["region"] == "us-west-2"
    for zone in cfg["provider"]["availability_zone"].split(","):
        assert zone.startswith(cfg["provider"]["region"])
    assert isinstance(cfg["idle_timeout_minutes"], (int, float)) and cfg["idle_timeout_minutes"] > 0


def test_onprem_provider():
    cfg = load_onprem()
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert cfg["provider"]["head_ip"] not in cfg["provider"]["worker_ips"]
    assert cfg["auth"]["ssh_user"] and cfg["auth"]["ssh_private_key"]
    # The local provider makes its own single node type; giving one aborts `ray up`.
    assert "available_node_types" not in cfg and "head_node_type" not in cfg


@pytest.mark.parametrize("break_it", [
    pytest.param(lambda c: c.update(max_worker=4), id="unknown-top-level-key"),
    pytest.param(lambda c: c.update(max_workers="eight"), id="max_workers-not-int"),
    pytest.param(lambda c: c["docker"].update(pull_before_run="yes"), id="docker-bool-as-string"),
    pytest.param(lambda c: c["docker"].update(imgae="x"), id="docker-unknown-key"),
    pytest.param(lambda c: c.update(setup_commands="pip install -e ~/expertpar"),
                 id="commands-not-a-list"),
])
def test_broken_copies_are_refused(config, break_it):
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        ray_check(broken)


def test_node_type_without_resources_is_refused():
    broken = load_aws()
    for node_type in broken["available_node_types"].values():
        node_type.pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        ray_check(broken)


# ---------------------------------------------------------------- expertpar's invariants


def test_image_matches_installed_ray_and_python_311(config):
    docker = config["docker"]
    images = [docker["image"]] + [docker[k] for k in ("head_image", "worker_image") if k in docker]
    for image in images:
        m = IMAGE_RE.match(image)
        assert m, f"{image!r} is not rayproject/ray:<version>-py<NN>-gpu"
        assert m["ray"] == ray.__version__, f"{image}: cluster Ray != installed Ray {ray.__version__}"
        assert m["py"] == "311"
    assert docker["container_name"]
    assert docker["pull_before_run"] is True
    assert "--ulimit nofile=65536:65536" in docker["run_options"]


def test_dashboard_listens_on_localhost_only(config):
    head = start_lines(config["head_start_ray_commands"])
    assert len(head) == 1
    cmd = head[0]
    assert "ray start --head" in cmd
    assert "--port=6379" in cmd
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in cmd
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", cmd), cmd
    everything = yaml.safe_dump(config)
    assert "0.0.0.0" not in everything
    assert config["head_start_ray_commands"][0] == "ray stop"


def test_workers_join_the_head(config):
    assert config["worker_start_ray_commands"][0] == "ray stop"
    (cmd,) = start_lines(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in cmd


def test_token_auth_on_every_node(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in start_lines(config[key]):
            assert re.search(r"export RAY_AUTH_MODE=token\s*(&&|;)", cmd), f"{key}: {cmd}"
    # The token file (~/.ray/auth_token) reaches every node before Ray starts there.
    assert config["file_mounts"].get("~/.ray") == "~/.ray"


def test_head_runs_no_work_aws():
    cfg = load_aws()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head.get("max_workers", 0) == 0
    # No GPU instance family for the head (g*, p*, trn*, inf* carry accelerators).
    assert not re.match(r"^(g|p|trn|inf)\d", head["node_config"]["InstanceType"])


def test_head_runs_no_work_onprem():
    (cmd,) = start_lines(load_onprem()["head_start_ray_commands"])
    assert "--num-cpus=0" in cmd and "--num-gpus=0" in cmd


def test_gpu_workers_autoscale():
    cfg = load_aws()
    gpu_types = {name: t for name, t in cfg["available_node_types"].items()
                 if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, name
        assert t["max_workers"] > t["min_workers"], name
        assert t["max_workers"] <= cfg["max_workers"], name
        instance = t["node_config"]["InstanceType"]
        assert instance in AWS_INSTANCE_RESOURCES, f"{name}: unknown instance type {instance}"
        assert t["resources"] == AWS_INSTANCE_RESOURCES[instance], \
            f"{name}: declared resources do not match {instance}"


def test_setup_installs_the_project(config):
    assert config["file_mounts"].get("~/expertpar") == "."
    assert 'name = "expertpar"' in (ROOT / "pyproject.toml").read_text()
    assert any(re.search(r"pip install .*-e ~/expertpar\b", c) for c in config["setup_commands"])
    # torch comes from pip (as the project's pins allow), never an exact pin here.
    assert not any(re.search(r"torch==", c) for c in config["setup_commands"])
    for pattern in (".venv", ".git"):
        assert pattern in config["rsync_exclude"]


def test_shared_storage_is_mounted_in_the_container(config):
    assert f"-v {SHARED_DIR}:{SHARED_DIR}" in config["docker"]["run_options"]


# ---------------------------------------------------------------- jobs


JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def test_jobs_exist():
    assert {p.name for p in JOBS} >= {"quickstart.yaml", "gpu_cluster.yaml"}


def test_gpu_job_fits_the_cluster():
    job = load_config(ROOT / "jobs" / "gpu_cluster.yaml")
    cfg = load_aws()
    assert job.distributed.backend == "ray" and job.distributed.use_gpu
    assert job.train.device == "auto"
    workers = [t for name, t in cfg["available_node_types"].items()
               if name != cfg["head_node_type"]]
    node = max(workers, key=lambda t: t["resources"].get("GPU", 0))["resources"]
    # Each actor and each train worker (1 GPU) fits on one node ...
    assert job.experts.gpus_per_actor <= node["GPU"]
    assert job.experts.cpus_per_actor <= node["CPU"]
    assert job.distributed.cpus_per_worker <= node["CPU"] and node["GPU"] >= 1
    # ... and the whole job fits within max_workers nodes.
    gpus = job.distributed.num_workers + job.experts.num_actors * job.experts.gpus_per_actor
    assert gpus <= cfg["max_workers"] * node["GPU"]
    # Driver and train workers share the run directory, so it must be on the shared mount.
    assert Path(job.run.out_dir).is_relative_to(SHARED_DIR)
    # Shard files are read on other nodes: paths must not depend on the driver's cwd.
    for split in (job.data.train, job.data.eval):
        assert Path(split).is_absolute(), split
        assert split.startswith("/home/ray/expertpar/"), split  # the file_mounts target


"""Strict config loading: errors name the key path and value, --set overrides, round trips."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from expertpar.config import (Config, ConfigError, MoEConfig, RunConfig, config_from_dict,
                              config_to_dict, dump_config, load_config, parse_override)

REPO = Path(__file__).resolve().parents[1]
BASE = {"data": {"train": "data/synth/train"}}  # the one required value


def build(tree: dict | None = None, overrides=()) -> Config:
    merged = {**BASE, **(tree or {})}
    if "data" in (tree or {}):
        merged["data"] = {**BASE["data"], **tree["data"]}
    return config_from_dict(merged, overrides)


def error_of(tree: dict | None = None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        build(tree, overrides)
    return str(info.value)


# ------------------------------------------------------------------ defaults


def test_minimal_config_uses_defaults():
    cfg = build()
    assert cfg == Config(data=dataclasses.replace(Config().data, train="data/synth/train"))
    assert cfg.model.moe.num_experts == 4


def test_missing_train_is_refused_when_data_section_present():
    with pytest.raises(ConfigError, match=r"'data\.train'"):
        config_from_dict({"data": {}})
    with pytest.raises(ConfigError, match=r"'data\.train'"):
        config_from_dict({"data": None})


def test_missing_train_is_refused_when_data_section_absent():
    with pytest.raises(ConfigError, match=r"data\.train"):
        config_from_dict({"run": {"name": "x"}})


def test_config_is_frozen():
    cfg = build()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.dim = 3  # type: ignore[misc]


# ------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key_named():
    msg = error_of({"bogus": 1})
    assert "'bogus'" in msg
    assert "<root>" in msg  # says where it looked


def test_unknown_nested_key_names_full_path():
    msg = error_of({"model": {"moe": {"bogus": 3}}})
    assert "'model.moe.bogus'" in msg
    assert "num_experts" in msg  # lists the known keys


def test_unknown_key_in_section():
    assert "'train.lrate'" in error_of({"train": {"lrate": 0.1}})


def test_section_must_be_a_mapping():
    msg = error_of({"model": 5})
    assert "'model'" in msg and "5" in msg


# ------------------------------------------------------------------ types


def test_wrong_type_names_path_and_value():
    msg = error_of({"model": {"dim": "a"}})
    assert "'model.dim'" in msg
    assert "'a'" in msg
    assert "integer" in msg


def test_int_accepted_for_float_and_converted():
    cfg = build({"train": {"lr": 1}, "model": {"moe": {"capacity_factor": 2}}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.model.moe.capacity_factor, float)


def test_bool_refused_for_int_field():
    msg = error_of({"model": {"dim": True}})
    assert "'model.dim'" in msg and "True" in msg


def test_bool_refused_for_float_field():
    msg = error_of({"train": {"lr": True}})
    assert "'train.lr'" in msg and "True" in msg


def test_float_refused_for_int_field():
    msg = error_of({"model": {"depth": 2.5}})
    assert "'model.depth'" in msg and "2.5" in msg


def test_string_number_not_coerced():
    msg = error_of({"model": {"dim": "64"}})
    assert "'model.dim'" in msg and "'64'" in msg


def test_int_refused_for_bool_field():
    msg = error_of({"model": {"moe": {"dropless": 1}}})
    assert "'model.moe.dropless'" in msg and "1" in msg


def test_literal_choices():
    msg = error_of({"model": {"moe": {"drop_policy": "random"}}})
    assert "'model.moe.drop_policy'" in msg and "'random'" in msg and "probability" in msg
    msg = error_of({"model": {"moe": {"activation": "tanh"}}})
    assert "'model.moe.activation'" in msg and "'tanh'" in msg and "silu" in msg


def test_optional_int_accepts_null_and_rejects_bool():
    assert build({"data": {"max_train_samples": None}}).data.max_train_samples is None
    assert build({"data": {"max_train_samples": 10}}).data.max_train_samples == 10
    msg = error_of({"data": {"max_train_samples": True}})
    assert "'data.max_train_samples'" in msg


def test_list_fields_become_tuples_and_items_are_checked():
    cfg = build({"eval": {"recall_at": [1, 3]}})
    assert cfg.eval.recall_at == (1, 3)
    msg = error_of({"eval": {"recall_at": [1, "x"]}})
    assert "'eval.recall_at[1]'" in msg and "'x'" in msg


def test_non_finite_float_refused():
    msg = error_of({"train": {"lr": float("nan")}})
    assert "'train.lr'" in msg and "nan" in msg


# ------------------------------------------------------------------ impossible values


def test_top_k_above_num_experts():
    msg = error_of({"model": {"moe": {"num_experts": 4, "top_k": 5}}})
    assert "'model.moe.top_k'" in msg and "5" in msg and "(4)" in msg


def test_top_k_equal_num_experts_ok():
    assert build({"model": {"moe": {"num_experts": 2, "top_k": 2}}}).model.moe.top_k == 2


@pytest.mark.parametrize("value", [0, -1.0])
def test_capacity_factor_must_be_positive_unless_dropless(value):
    msg = error_of({"model": {"moe": {"capacity_factor": value}}})
    assert "'model.moe.capacity_factor'" in msg
    assert repr(float(value)) in msg
    cfg = build({"model": {"moe": {"capacity_factor": value, "dropless": True}}})
    assert cfg.model.moe.dropless and cfg.model.moe.capacity_factor == value


def test_eval_capacity_factor_must_be_positive_unless_dropless():
    msg = error_of({"model": {"moe": {"eval_capacity_factor": 0}}})
    assert "'model.moe.eval_capacity_factor'" in msg
    build({"model": {"moe": {"eval_capacity_factor": 0, "dropless": True}}})


def test_image_size_not_divisible_by_patch_size():
    msg = error_of({"data": {"image_size": 30}, "model": {"patch_size": 4}})
    assert "'model.patch_size'" in msg and "4" in msg and "30" in msg
    # fine with the CNN stem, which has no patches
    assert build({"data": {"image_size": 30},
                  "model": {"patch_size": 4, "stem": "cnn"}}).data.image_size == 30


def test_heads_must_divide_dim():
    msg = error_of({"model": {"dim": 10, "heads": 4}})
    assert "'model.heads'" in msg and "(10)" in msg


def test_moe_every_above_depth_names_nested_path():
    msg = error_of({"model": {"depth": 2, "moe": {"every": 3}}})
    assert "'model.moe.every'" in msg and "3" in msg


@pytest.mark.parametrize("tree,key", [
    ({"model": {"moe": {"num_experts": 0, "top_k": 1}}}, "model.moe.num_experts"),
    ({"model": {"moe": {"temperature": 0}}}, "model.moe.temperature"),
    ({"model": {"moe": {"noise_std": -0.1}}}, "model.moe.noise_std"),
    ({"model": {"moe": {"z_loss_weight": -1}}}, "model.moe.z_loss_weight"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"beta2": 1.0}}, "train.beta2"),
    ({"data": {"image_size": 4}}, "data.image_size"),
    ({"tokenizer": {"context_length": 2}}, "tokenizer.context_length"),
    ({"run": {"name": "a/b"}}, "run.name"),
])
def test_range_checks_name_the_path(tree, key):
    assert f"'{key}'" in error_of(tree)


# ------------------------------------------------------------------ --set overrides


def test_parse_override_values():
    assert parse_override("model.moe.top_k=2") == ("model.moe.top_k", 2)
    assert parse_override("train.lr=0.005") == ("train.lr", 0.005)
    assert parse_override("data.hflip=true") == ("data.hflip", True)
    assert parse_override("run.name=abc") == ("run.name", "abc")
    assert parse_override(" model.dim = 32 ") == ("model.dim", 32)
    assert parse_override("data.eval=null") == ("data.eval", None)
    assert parse_override("eval.recall_at=[1, 2]") == ("eval.recall_at", [1, 2])
    assert parse_override("run.name=a=b") == ("run.name", "a=b")  # split at the first '='


@pytest.mark.parametrize("text", ["model.dim", "=3", "", "  =x"])
def test_parse_override_malformed_refused(text):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override(text)


def test_set_overrides_all_types():
    cfg = build(overrides=["model.moe.num_experts=8", "train.lr=0.0005", "data.hflip=true",
                           "run.name=exp1", "model.moe.drop_policy=position",
                           "eval.recall_at=[1, 2]", "model.moe.top_k=2"])
    assert cfg.model.moe.num_experts == 8
    assert cfg.train.lr == 0.0005
    assert cfg.data.hflip is True
    assert cfg.run.name == "exp1"
    assert cfg.model.moe.drop_policy == "position"
    assert cfg.eval.recall_at == (1, 2)
    assert cfg.model.moe.top_k == 2
    # untouched values keep their defaults / file values
    assert cfg.data.train == "data/synth/train"
    assert cfg.model.dim == 64


def test_set_overrides_file_values_and_later_set_wins():
    cfg = build({"model": {"dim": 32, "moe": {"top_k": 1}}},
                overrides=["model.moe.top_k=2", "model.moe.top_k=3"])
    assert cfg.model.moe.top_k == 3
    assert cfg.model.dim == 32


def test_set_does_not_mutate_input_dict():
    tree = {"data": {"train": "x"}, "model": {"moe": {"top_k": 1}}}
    config_from_dict(tree, ["model.moe.top_k=2"])
    assert tree == {"data": {"train": "x"}, "model": {"moe": {"top_k": 1}}}


def test_set_int_for_float_field():
    assert build(overrides=["train.lr=1"]).train.lr == 1.0


def test_set_unknown_key_refused():
    with pytest.raises(ConfigError, match=r"'model\.moe\.bogus'"):
        build(overrides=["model.moe.bogus=1"])
    with pytest.raises(ConfigError, match=r"'nothere'"):
        build(overrides=["nothere.x=1"])


def test_set_malformed_refused():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build(overrides=["model.moe.top_k"])


def test_set_wrong_type_refused_with_path_and_value():
    msg = error_of(overrides=["model.dim=abc"])
    assert "'model.dim'" in msg and "'abc'" in msg
    msg = error_of(overrides=["model.dim=true"])
    assert "'model.dim'" in msg and "True" in msg


def test_set_impossible_value_refused():
    msg = error_of(overrides=["model.moe.top_k=9"])
    assert "'model.moe.top_k'" in msg and "9" in msg


def test_set_into_a_scalar_refused():
    with pytest.raises(ConfigError, match="not a section"):
        build({"model": {"dim": 32}}, overrides=["model.dim.x=1"])


def test_set_scientific_notation_float():
    assert build(overrides=["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_set_into_empty_section_from_file():
    cfg = config_from_dict({"data": {"train": "x"}, "model": None}, ["model.dim=32"])
    assert cfg.model.dim == 32


def test_empty_section_accepted_without_overrides():
    assert config_from_dict({"data": {"train": "x"}, "model": None}).model == Config().model


# ------------------------------------------------------------------ files


def test_load_config_from_written_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "run:\n  name: t1\n  seed: 3\n"
        "data:\n  train: shards/\n  image_size: 16\n"
        "model:\n  dim: 32\n  heads: 2\n  moe:\n    num_experts: 8\n    top_k: 2\n"
        "    capacity_factor: 1\n"
        "train:\n  lr: 0.01\n")
    cfg = load_config(path)
    assert cfg.run.name == "t1" and cfg.run.seed == 3
    assert cfg.data.train == "shards/" and cfg.data.image_size == 16
    assert cfg.model.dim == 32 and cfg.model.heads == 2
    assert cfg.model.moe == dataclasses.replace(MoEConfig(), num_experts=8, top_k=2,
                                                capacity_factor=1.0)
    assert cfg.train.lr == 0.01
    assert cfg.run_dir == Path("runs") / "t1"
    # overrides apply on top of the file
    assert load_config(path, ["model.moe.top_k=3"]).model.moe.top_k == 3


def test_load_config_error_is_prefixed_with_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: x\nmodel:\n  moe:\n    top_k: 9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "'model.moe.top_k'" in msg and "9" in msg


def test_load_config_empty_file_refused_for_missing_train(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"data\.train"):
        load_config(path)


def test_load_config_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_load_config_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "broken.yaml" in str(info.value) and "YAML" in str(info.value)


def test_missing_config_file_names_the_file(tmp_path):
    path = tmp_path / "nope" / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_quickstart_job_loads():
    cfg = load_config(REPO / "jobs" / "quickstart.yaml")
    raw = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    assert cfg.run.name == raw["run"]["name"]
    assert cfg.data.train == raw["data"]["train"]
    assert cfg.model.moe.num_experts == raw["model"]["moe"]["num_experts"]
    assert cfg.model.moe.top_k == raw["model"]["moe"]["top_k"]
    assert cfg.train.lr == raw["train"]["lr"]
    assert cfg.data.image_size % cfg.model.patch_size == 0


# ------------------------------------------------------------------ the shipped jobs

# jobs/sweep.yaml is a sweep file, not a job (tests/test_sweep_config.py loads it).
JOBS = sorted(p for p in (REPO / "jobs").glob("*.yaml") if p.name != "sweep.yaml")
README = " ".join((REPO / "README.md").read_text().split())  # line breaks -> single spaces
# The command each job's header comment gives for making its data, e.g.
#   expertpar data synth --out data/synth --n 6000 --n-test 1000
DATA_CMD = re.compile(r"expertpar data (?P<kind>[\w-]+) --out (?P<out>\S+)(?P<args>[^\n]*)")
# What the writers produce: <out>/train and <out>/test, images of this side.
DATA_IMAGE_SIZE = {"synth": 32, "fashion-mnist": 28}


def test_jobs_exist():
    assert {p.name for p in JOBS} >= {"quickstart.yaml", "fashion_mnist.yaml", "gpu_cluster.yaml"}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_loads(path):
    text = path.read_text()
    raw = yaml.safe_load(text)
    cfg = load_config(path)

    # It names its run, explicitly, after the job file (runs/<name> is where it writes).
    assert raw["run"]["name"] == cfg.run.name
    assert cfg.run.name != RunConfig().name
    assert cfg.run.name.replace("-", "_") == path.stem
    assert cfg.run_dir == Path(raw["run"]["out_dir"]) / cfg.run.name

    # Its data keys are set, to the splits that the data command in its header writes.
    assert isinstance(raw["data"]["train"], str) and raw["data"]["train"]
    assert isinstance(raw["data"]["eval"], str) and raw["data"]["eval"]
    made = DATA_CMD.search(text)
    assert made, f"{path.name} does not say how to make its data"
    out = made["out"].rstrip("/")
    assert cfg.data.train.endswith(f"{out}/train"), (cfg.data.train, out)
    assert cfg.data.eval.endswith(f"{out}/test"), (cfg.data.eval, out)
    size = re.search(r"--image-size (\d+)", made["args"])
    assert cfg.data.image_size == (int(size[1]) if size else DATA_IMAGE_SIZE[made["kind"]])

    # Its backend and actor counts are valid.
    assert cfg.distributed.backend in ("local", "ray")
    assert cfg.model.variant == "moe" and cfg.num_moe_layers >= 1
    if cfg.distributed.backend == "ray":
        shards = cfg.num_moe_layers * cfg.model.moe.num_experts
        assert 1 <= cfg.experts.num_actors <= shards
        assert cfg.distributed.num_workers >= 1
        assert cfg.train.batch_size % cfg.distributed.num_workers == 0
        assert cfg.experts.cpus_per_actor > 0 or cfg.experts.gpus_per_actor > 0
    assert cfg.train.warmup_steps < cfg.train.steps
    assert cfg.train.log_every <= cfg.train.steps


def test_job_run_names_are_distinct():
    names = [load_config(p).run_dir for p in JOBS]
    assert len(set(names)) == len(names), names


def test_quickstart_job_is_what_the_readme_says():
    cfg = load_config(REPO / "jobs" / "quickstart.yaml")
    # "`make demo` writes 6,000 + 1,000 synthetic image-caption pairs to `data/synth`, trains the
    # quickstart model (`jobs/quickstart.yaml`) through the Ray path (an embedded local Ray, 2
    # expert actors, 1 router actor, 1 Ray Train worker fed by Ray Data)"
    demo = re.search(r"`make demo` writes [\d,]+ \+ [\d,]+ synthetic image-caption pairs to "
                     r"`(?P<data>[^`]+)`, trains the quickstart model \(`jobs/quickstart.yaml`\) "
                     r"through the Ray path \(an embedded local Ray, (?P<actors>\d+) expert "
                     r"actors, 1 router actor, (?P<workers>\d+) Ray Train worker", README)
    assert demo, "README's `make demo` paragraph changed: update this test"
    assert cfg.data.train == f"{demo['data']}/train"
    assert cfg.data.eval == f"{demo['data']}/test"
    assert cfg.distributed.backend == "ray"
    assert cfg.distributed.address is None  # embedded: no address, no RAY_ADDRESS needed
    assert cfg.experts.num_actors == int(demo["actors"])
    assert cfg.distributed.num_workers == int(demo["workers"])
    # "the Ray training job itself (600 steps, batch 64, 2 MoE layers x 4 experts, top-1, CNN
    # stem, 2 expert actors, 1 router actor, 1 Ray Train worker)"
    job = re.search(r"\((?P<steps>\d+) steps, batch (?P<batch>\d+), (?P<layers>\d+) MoE layers x "
                    r"(?P<experts>\d+) experts, top-(?P<k>\d+), (?P<stem>\w+) stem, "
                    r"(?P<actors>\d+) expert actors, 1 router actor, (?P<workers>\d+) Ray Train "
                    r"worker\)", README)
    assert job, "README's measured quickstart run changed: update this test"
    assert cfg.train.steps == int(job["steps"]) == 600
    assert cfg.train.batch_size == int(job["batch"]) == 64
    assert cfg.num_moe_layers == int(job["layers"]) == 2
    assert cfg.model.moe.num_experts == int(job["experts"]) == 4
    assert cfg.model.moe.top_k == int(job["k"]) == 1
    assert cfg.model.stem == job["stem"].lower() == "cnn"
    assert cfg.experts.num_actors == int(job["actors"]) == 2
    assert cfg.distributed.num_workers == int(job["workers"]) == 1
    # `expertpar eval runs/quickstart` (README and Makefile) reads the run this job writes
    assert "expertpar eval runs/quickstart" in README
    assert cfg.run_dir == Path("runs") / "quickstart"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^DEMO_DATA := data/synth$", makefile, re.M)
    assert "expertpar train jobs/quickstart.yaml" in makefile


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("overrides", [
    [],
    ["model.moe.top_k=2", "model.moe.dropless=true", "model.moe.capacity_factor=0",
     "data.eval=held/out", "data.max_eval_samples=50", "eval.recall_at=[1, 2, 3]",
     "train.device=auto", "model.towers=separate", "model.moe.temperature=0.5"],
])
def test_dump_then_reload_round_trips(tmp_path, overrides):
    cfg = build(overrides=overrides)
    text = dump_config(cfg)
    path = tmp_path / "dumped.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(yaml.safe_load(text)) == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_dump_config_is_plain_yaml_with_lists():
    cfg = build()
    data = yaml.safe_load(dump_config(cfg))
    assert data["eval"]["recall_at"] == [1, 5, 10]
    assert data["model"]["moe"]["num_experts"] == 4
    assert list(data) == [f.name for f in dataclasses.fields(Config)]
    assert list(data)[:6] == ["run", "data", "tokenizer", "model", "train", "eval"]


@pytest.mark.parametrize("key, value", [
    ("top_k", 2), ("dropless", True), ("drop_policy", "position"),
    ("batch_prioritized_images", True)])
def test_expert_choice_refuses_token_choice_knobs(key, value):
    # Each would be silently ignored by expert choice, so it is refused with the key named.
    with pytest.raises(ConfigError, match=rf"model\.moe\.{key}.*expert_choice"):
        config_from_dict({"data": {"train": "x"},
                          "model": {"moe": {"routing": "expert_choice", key: value}}})


def test_expert_choice_accepts_its_own_knobs():
    cfg = config_from_dict({"data": {"train": "x"}, "model": {"moe": {
        "routing": "expert_choice", "capacity_factor": 2.0, "eval_capacity_factor": 3.0}}})
    assert cfg.model.moe.routing == "expert_choice"
    with pytest.raises(ConfigError, match="'model.moe.routing': 'experts_choice' is not one of"):
        config_from_dict({"data": {"train": "x"}, "model": {"moe": {"routing": "experts_choice"}}})


def test_use_gpu_with_a_cpu_device_is_refused_as_inconsistent():
    tree = {"data": {"train": "d"}, "distributed": {"backend": "ray", "use_gpu": True},
            "train": {"device": "cpu"}}
    with pytest.raises(ConfigError, match=r"distributed\.use_gpu.*train\.device"):
        config_from_dict(tree)
    tree["train"]["device"] = "auto"
    assert config_from_dict(tree).distributed.use_gpu


@pytest.mark.parametrize("key", ["distributed.threads_per_worker", "experts.router_threads",
                                 "experts.threads_per_actor"])
def test_thread_counts_are_positive_or_null(key):
    assert config_from_dict({"data": {"train": "d"}}, [f"{key}=2"])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"data": {"train": "d"}}, [f"{key}=0"])


def test_a_gpu_share_per_worker_reaches_ray_train_and_needs_use_gpu():
    from expertpar.app.ray_job import scaling
    tree = {"data": {"train": "d"}, "train": {"device": "cuda"},
            "distributed": {"backend": "ray", "use_gpu": True, "gpus_per_worker": 0.5}}
    assert scaling(config_from_dict(tree)) == {
        "num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 1.0, "GPU": 0.5}}
    assert scaling(config_from_dict({"data": {"train": "d"}}))["resources_per_worker"] == {
        "CPU": 1.0}
    with pytest.raises(ConfigError, match=r"distributed\.gpus_per_worker.*use_gpu is false"):
        config_from_dict({"data": {"train": "d"}, "distributed": {"gpus_per_worker": 0.5}})
    for bad in (0, 1.5, -1):
        with pytest.raises(ConfigError, match=rf"distributed\.gpus_per_worker.*{bad}"):
            config_from_dict({**tree, "distributed": {"use_gpu": True, "gpus_per_worker": bad}})
    # Two workers may not share one GPU: NCCL would refuse at set-up, long after the config.
    with pytest.raises(ConfigError, match=r"distributed\.gpus_per_worker.*num_workers 2.*NCCL"):
        config_from_dict({**tree, "distributed": {"backend": "ray", "use_gpu": True,
                                                  "gpus_per_worker": 0.5, "num_workers": 2}})


def test_an_unknown_expert_precision_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"model\.moe\.expert_precision.*float16.*bfloat16"):
        config_from_dict({"data": {"train": "d"},
                          "model": {"moe": {"expert_precision": "float16"}}})


def test_a_router_gpu_share_must_fit_on_the_first_expert_actors_gpu():
    ok = config_from_dict({"data": {"train": "d"},
                           "experts": {"gpus_per_actor": 0.5, "router_gpus": 0.25}})
    assert ok.experts.router_gpus == 0.25
    with pytest.raises(ConfigError, match=r"experts\.router_gpus.*gpus_per_actor \+ router_gpus"):
        config_from_dict({"data": {"train": "d"},
                          "experts": {"gpus_per_actor": 1, "router_gpus": 0.25}})
    with pytest.raises(ConfigError, match=r"experts\.router_gpus.*>= 0"):
        config_from_dict({"data": {"train": "d"}, "experts": {"router_gpus": -0.5}})


def test_the_call_channel_is_socket_by_default_and_refuses_others_with_the_choices():
    assert config_from_dict({"data": {"train": "d"}}).experts.calls == "socket"
    assert config_from_dict({"data": {"train": "d"}}, ["experts.calls=ray"]).experts.calls == "ray"
    with pytest.raises(ConfigError, match=r"experts\.calls.*'grpc'.*socket.*ray"):
        config_from_dict({"data": {"train": "d"}}, ["experts.calls=grpc"])


def test_routers_must_divide_the_workers_and_match_the_routing_groups():
    tree = {"data": {"train": "d"}, "distributed": {"backend": "ray", "num_workers": 4},
            "train": {"batch_size": 64}, "model": {"moe": {"routing_groups": 2}},
            "experts": {"num_routers": 2}}
    assert config_from_dict(tree).experts.num_routers == 2
    with pytest.raises(ConfigError, match=r"experts\.num_routers.*3 must divide "
                                          r"distributed\.num_workers \(4\)"):
        config_from_dict(tree, ["experts.num_routers=3", "model.moe.routing_groups=3"])
    with pytest.raises(ConfigError, match=r"model\.moe\.routing_groups.*1 must equal "
                                          r"experts\.num_routers \(2\)"):
        config_from_dict(tree, ["model.moe.routing_groups=1"])
    with pytest.raises(ConfigError, match=r"experts\.num_routers.*>= 1"):
        config_from_dict(tree, ["experts.num_routers=0", "model.moe.routing_groups=0"])
    # In process, routing groups need no routers.
    assert config_from_dict({"data": {"train": "d"}, "model": {"moe": {"routing_groups": 4}}})

"""The sweep file: read strictly and checked against its base job before Ray starts, every error
naming the key and the value."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from expertpar.app.sweep_config import load_sweep
from expertpar.config import ConfigError
from sweep_helpers import write_sweep

REPO = Path(__file__).resolve().parents[1]


def test_the_example_sweep_searches_the_quickstarts_moe_knobs():
    sweep = load_sweep(REPO / "jobs" / "sweep.yaml")
    assert sweep.base.run.name == "quickstart" and sweep.base.distributed.backend == "ray"
    assert sweep.base.train.steps == 400 and sweep.base.train.eval_every == 100
    assert {"model.moe.num_experts", "model.moe.top_k", "model.moe.expert_hidden",
            "model.moe.temperature", "model.moe.capacity_factor",
            "model.moe.load_balance_weight", "model.moe.z_loss_weight"} == set(sweep.knobs)
    assert sweep.config.metric == "zero_shot/top1" and sweep.config.scheduler.early_stopping
    # every combination of the choices and range ends (3 x 2 x 3 x 2 x 2 x 2 x 2) is a job
    assert len(sweep.extremes) == 288


def test_a_good_sweep_loads_with_its_specs_and_fixed_keys(tmp_path):
    sweep = load_sweep(write_sweep(
        tmp_path, set={"train.lr": 0.01},
        space={"model.moe.temperature": {"loguniform": ["1e-1", 10]},
               "model.moe.num_experts": {"randint": [2, 4]}}))
    dims = {d.key: d for d in sweep.config.space}
    assert (dims["model.moe.temperature"].kind, dims["model.moe.temperature"].values) == (
        "loguniform", (0.1, 10.0))
    assert dims["model.moe.num_experts"].values == (2, 4)
    assert sweep.base.train.lr == 0.01
    assert {knobs["model.moe.num_experts"] for knobs, _ in sweep.extremes} == {2, 4}


def test_an_unknown_sweep_key_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown sweep key 'num_sample' = 4"):
        load_sweep(write_sweep(tmp_path, num_sample=4))
    with pytest.raises(ConfigError, match=r"unknown sweep key 'scheduler.grace' = 3"):
        load_sweep(write_sweep(tmp_path, scheduler={"grace": 3}))
    with pytest.raises(ConfigError, match=r"sweep key 'num_samples': 0 must be >= 1"):
        load_sweep(write_sweep(tmp_path, num_samples=0))
    with pytest.raises(ConfigError, match=r"sweep key 'scheduler.grace_period': 'x' is not an "
                                          r"integer"):
        load_sweep(write_sweep(tmp_path, scheduler={"grace_period": "x"}))


@pytest.mark.parametrize("spec, why", [
    ({"choise": [1, 2]}, "is not a search spec"),
    (2, "is not a search spec"),
    ({"choice": [1], "uniform": [0, 1]}, "is not a search spec"),
    ({"choice": []}, "choice needs a non-empty list"),
    ({"uniform": [2.0, 1.0]}, "needs lo < hi"),
    ({"uniform": [1.0]}, "uniform needs [lo, hi]"),
    ({"loguniform": [0.0, 1.0]}, "loguniform needs lo > 0"),
])
def test_a_bad_search_spec_is_refused_naming_its_key_and_value(tmp_path, spec, why):
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path, space={"model.moe.temperature": spec}))
    assert f"sweep key 'space.model.moe.temperature': {spec!r}" in str(err.value)
    assert why in str(err.value)


def test_a_randint_bound_that_is_not_an_integer_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"'space.model.moe.top_k.randint\[0\]': 1.5 is not an "
                                          r"integer"):
        load_sweep(write_sweep(tmp_path, space={"model.moe.top_k": {"randint": [1.5, 3]}}))


@pytest.mark.parametrize("key, why", [
    ("model.moe.num_expert", "is not a config key (known keys under 'model.moe'"),
    ("model.mo.top_k", "is not a config key (known keys under 'model'"),
    ("model.moe", "is a section, not a config key"),
    ("model.moe.top_k.x", "is not a config key ('model.moe.top_k' is a value"),
])
def test_a_space_key_that_is_not_a_config_key_is_refused_by_name(tmp_path, key, why):
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path, space={key: {"choice": [1, 2]}}))
    assert f"sweep key 'space.{key}': '{key}' {why}" in str(err.value)


def test_a_knob_also_given_with_set_is_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"--set model.moe.top_k=2: 'model.moe.top_k' is a "
                                          r"knob of the sweep \(sweep key 'space.model.moe.top_k'\)"):
        load_sweep(write_sweep(tmp_path), ["model.moe.top_k=2"])
    assert load_sweep(write_sweep(tmp_path), ["train.lr=0.01"]).base.train.lr == 0.01


def test_a_key_the_sweep_sets_itself_is_not_a_knob(tmp_path):
    with pytest.raises(ConfigError, match=r"'space.train.steps': \{'choice': \[10, 20\]\}: "
                                          r"'train.steps' is not a knob"):
        load_sweep(write_sweep(tmp_path, space={"train.steps": {"choice": [10, 20]}}))


def test_a_combination_of_values_that_makes_no_valid_job_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"the space's values model.moe.top_k=3, "
                                          r"model.moe.num_experts=2 make no valid job: config "
                                          r"key 'model.moe.top_k': 3 must be <= "
                                          r"model.moe.num_experts \(2\)"):
        load_sweep(write_sweep(tmp_path, space={"model.moe.top_k": {"choice": [1, 3]},
                                                "model.moe.num_experts": {"choice": [2, 4]}}))
    # A range's samples are floats: an integer key refuses it, by name.
    with pytest.raises(ConfigError, match=r"model.moe.num_experts=2 make no valid job: config "
                                          r"key 'model.moe.num_experts': 2.0 is not an integer"):
        load_sweep(write_sweep(tmp_path,
                               space={"model.moe.num_experts": {"uniform": [2, 8]}}))


def test_a_metric_the_reports_do_not_carry_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep key 'metric': 'accuracy' is not a metric every "
                                          r"report carries"):
        load_sweep(write_sweep(tmp_path, metric="accuracy"))
    # An evaluation metric needs an evaluation at every report (checkpoint) step.
    with pytest.raises(ConfigError, match=r"sweep key 'metric': 'zero_shot/top1' is an "
                                          r"evaluation metric: each report .* must be a multiple "
                                          r"of train.eval_every \(0\)"):
        load_sweep(write_sweep(tmp_path, base={"train.eval_every": 0}))
    assert load_sweep(write_sweep(tmp_path, base={"train.eval_every": 0},
                                  metric="loss/total", mode="min")).config.mode == "min"


def test_a_grace_period_past_the_runs_end_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"'scheduler.grace_period': 30 must be <= the base "
                                          r"job's train.steps \(20\)"):
        load_sweep(write_sweep(tmp_path, scheduler={"grace_period": 30}))


def test_a_bad_base_job_is_refused_naming_the_base(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "missing.yaml",
                                    "space": {"model.moe.top_k": {"choice": [1]}}}))
    with pytest.raises(ConfigError, match=r"the base job \(sweep key 'base', with set: and "
                                          r"--set\): config file '.*missing.yaml' does not exist"):
        load_sweep(path)
    # A key under set: is checked as the base job's own.
    with pytest.raises(ConfigError, match=r"the base job .*: unknown config key "
                                          r"'model.moe.top' = 1"):
        load_sweep(write_sweep(tmp_path, set={"model.moe.top": 1}))


def test_a_space_key_that_is_not_a_dotted_name_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep key 'space': 1 is not a dotted config key"):
        load_sweep(write_sweep(tmp_path, space={1: {"choice": [1, 2]}}))


def test_a_zero_shot_metric_on_a_split_without_classes_is_refused_by_name(tmp_path):
    (tmp_path / "data" / "test").mkdir(parents=True)  # there, but no dataset.json
    with pytest.raises(ConfigError, match=r"sweep key 'metric': 'zero_shot/top1' needs class "
                                          r"names .* has no dataset.json with classes"):
        load_sweep(write_sweep(tmp_path, metric="zero_shot/top1", mode="max"))

"""A sweep's sizing and its outputs, without Ray: how many trials fit at once, the refusal of a
trial that fits nowhere, and the table, best.yaml and plot made from a sweep's rows."""
from __future__ import annotations

import csv

import pytest
from PIL import Image

from expertpar.app.sweep import trial_shapes, trials_at_once
from expertpar.app.sweep_config import load_sweep
from expertpar.app.sweep_results import (best_job, best_row, ranked, sweep_figure, table,
                                         write_csv)
from expertpar.config import load_config
from sweep_helpers import write_sweep

ACTORS = {"experts.num_actors": 2, "experts.cpus_per_actor": 0.5}


def test_a_trial_holds_its_workers_their_data_its_actors_and_a_sliver_for_itself(tmp_path):
    cfg = load_sweep(write_sweep(tmp_path, base=ACTORS)).base
    assert trial_shapes(cfg) == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5},
                                 {"CPU": 0.01}]


def test_as_many_trials_run_at_once_as_the_free_resources_hold_beside_a_spare_cpu(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, base=ACTORS, num_samples=8))
    # 3.01 CPUs a trial, 1 spare: 8 CPUs hold 2, 7 hold 1 (on one node, or split over two).
    assert trials_at_once(sweep, {"a": {"CPU": 8.0}}) == 2
    assert trials_at_once(sweep, {"a": {"CPU": 7.0}}) == 2 - 1
    assert trials_at_once(sweep, {"a": {"CPU": 4.0}, "b": {"CPU": 4.0}}) == 2
    assert trials_at_once(sweep, {"a": {"CPU": 100.0}}) == 8  # never more than num_samples
    capped = load_sweep(write_sweep(tmp_path, base=ACTORS, num_samples=8, max_concurrent=3))
    assert trials_at_once(capped, {"a": {"CPU": 100.0}}) == 3
    # The heaviest knob values bound it: 4 actors of 0.5 CPU make a trial of 4.01 CPUs.
    heavy = load_sweep(write_sweep(tmp_path, base=ACTORS, num_samples=8,
                                   space={"experts.num_actors": {"choice": [1, 4]}}))
    assert trials_at_once(heavy, {"a": {"CPU": 10.0}}) == 2
    assert trials_at_once(heavy, {"a": {"CPU": 9.0}}) == 1


def test_gpus_bound_the_trials_at_once_as_cpus_do(tmp_path):
    gpu = {"distributed.use_gpu": True, "train.device": "cuda", "experts.gpus_per_actor": 0.25,
           **ACTORS}
    sweep = load_sweep(write_sweep(tmp_path, base=gpu, num_samples=8))
    assert sum(s.get("GPU", 0.0) for s in trial_shapes(sweep.base)) == 1.5  # 1 + 2 x 0.25
    assert trials_at_once(sweep, {"a": {"CPU": 64.0, "GPU": 4.0}}) == 2
    assert trials_at_once(sweep, {"a": {"CPU": 64.0, "GPU": 2.0}}) == 1
    with pytest.raises(ValueError, match=r"a trial with model.moe.top_k=1 does not fit the "
                                         r"cluster: it holds 3.01 CPU, 1.5 GPU"):
        trials_at_once(sweep, {"a": {"CPU": 64.0}})


def test_a_trial_that_fits_nowhere_stops_the_sweep_naming_its_knob_values(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, base=ACTORS,
                                   space={"experts.num_actors": {"choice": [1, 4]}}))
    with pytest.raises(ValueError, match=r"a trial with experts.num_actors=4 does not fit the "
                                         r"cluster: it holds 4.01 CPU"):
        trials_at_once(sweep, {"a": {"CPU": 4.0}})  # 1 actor fits (2.51 + 1 spare), 4 do not


def rows():
    return [  # as app/sweep.py makes them from Tune's results, in no order
        {"trial": "t_00000", "model.moe.top_k": 1, "model.moe.temperature": 0.7,
         "zero_shot/top1": 0.25, "steps": 2, "seconds": 9.5, "stopped_early": True,
         "error": ""},
        {"trial": "t_00001", "model.moe.top_k": 2, "model.moe.temperature": 1.6,
         "zero_shot/top1": 0.5, "steps": 4, "seconds": 20.1, "stopped_early": False,
         "error": ""},
        {"trial": "t_00002", "model.moe.top_k": 2, "model.moe.temperature": 0.9,
         "zero_shot/top1": None, "steps": 0, "seconds": float("nan"), "stopped_early": False,
         "error": "RuntimeError: training failed: boom"},
    ]


def test_the_table_ranks_the_trials_and_the_best_becomes_a_job_file(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, space={
        "model.moe.top_k": {"choice": [1, 2]}, "model.moe.temperature": {"loguniform": [0.5, 2]}}))
    metric, knobs = "zero_shot/top1", sweep.knobs
    ordered = ranked(rows(), metric, "max")
    assert [r["trial"] for r in ordered] == ["t_00001", "t_00000", "t_00002"]
    assert best_row(rows(), metric, "min")["trial"] == "t_00000"

    text = table(ordered, knobs, metric).splitlines()
    assert text[0].split() == ["trial", "top_k", "temperature", metric, "steps", "seconds",
                               "stopped_early", "error"]
    assert text[1].split() == ["t_00001", "2", "1.6", "0.5", "4", "20.1", "no"]
    assert text[2].split() == ["t_00000", "1", "0.7", "0.25", "2", "9.5", "yes"]
    assert text[3].split()[:7] == ["t_00002", "2", "0.9", "-", "0", "nan", "no"]
    assert text[3].endswith("RuntimeError: training failed: boom")

    write_csv(ordered, knobs, metric, tmp_path / "results.csv")
    with (tmp_path / "results.csv").open() as f:
        back = list(csv.DictReader(f))
    assert [r["trial"] for r in back] == ["t_00001", "t_00000", "t_00002"]
    assert back[1]["model.moe.temperature"] == "0.7" and back[1]["stopped_early"] == "True"

    (tmp_path / "best.yaml").write_text(best_job(sweep.base, ordered[0], knobs,
                                                 sweep_file=sweep.path, metric=metric))
    best = load_config(tmp_path / "best.yaml")
    assert (best.model.moe.top_k, best.model.moe.temperature) == (2, 1.6)
    assert best.run.name == "tiny-best" and best.distributed.backend == "ray"
    assert best.model.moe.expert_hidden == sweep.base.model.moe.expert_hidden  # the rest: base


def test_the_plot_has_a_panel_per_knob_and_is_a_png(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, space={
        "model.moe.top_k": {"choice": [1, 2]}, "model.moe.temperature": {"loguniform": [0.5, 2]},
        "model.moe.routing": {"choice": ["token_choice"]}}))
    data = [dict(r, **{"model.moe.routing": "token_choice"}) for r in rows()]
    sweep_figure(data, sweep.config.space, "zero_shot/top1", "max", tmp_path / "sweep.png")
    with Image.open(tmp_path / "sweep.png") as img:
        assert img.format == "PNG" and img.width > 3 * 300


def test_the_command_refuses_a_bad_sweep_and_an_out_dir_holding_one_with_exit_2(tmp_path,
                                                                               capsys):
    from expertpar.app.cli import main

    bad = write_sweep(tmp_path, space={"model.moe.top_k": {"choise": [1, 2]}})
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "sweep key 'space.model.moe.top_k': {'choise': [1, 2]} is not a search spec" in (
        capsys.readouterr().err)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.csv").write_text("trial\n")
    assert main(["sweep", str(write_sweep(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    assert "already holds a sweep" in capsys.readouterr().err
    assert not (tmp_path / "out" / "trials").exists()

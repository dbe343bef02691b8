"""`expertpar sweep` end to end on a local Ray: two tiny trials, each a whole Ray run (expert
actors, router, Ray Train) reporting to Tune, run at once (checked) and leave the table, the best job and
the plot; and what a trial stopped in the middle of its run leaves is freed."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import ray
import yaml
from PIL import Image
from ray.util.placement_group import (placement_group, placement_group_table,
                                      remove_placement_group)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from conftest import tiny_config
from expertpar.app.cli import main
from expertpar.app.sweep import release_trial
from expertpar.config import dump_config, load_config

pytestmark = pytest.mark.slow


def test_a_sweep_of_two_ray_trials_writes_its_table_best_job_and_plot(ray_local, synth_dir,
                                                                      tmp_path, capsys):
    # 4 steps, a report (with an evaluation) every 2; one expert actor (and the router) each:
    # 2.51 CPUs a trial, so both fit in the fixture's 8 at once.
    base = tiny_config(synth_dir, tmp_path / "unused", **{
        "train.steps": 4, "train.warmup_steps": 1, "train.checkpoint_every": 2,
        "train.eval_every": 2, "train.log_every": 2, "data.max_eval_samples": 100,
        "experts.num_actors": 1, "experts.cpus_per_actor": 0.5})
    (tmp_path / "base.yaml").write_text(dump_config(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "metric": "zero_shot/top1", "mode": "max", "num_samples": 2,
        "scheduler": {"grace_period": 4},  # no rung before the last step: both run to it
        "space": {"model.moe.top_k": {"choice": [1, 2]},
                  "model.moe.temperature": {"loguniform": [0.5, 2.0]}}}, sort_keys=False))
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 0

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and len({r["trial"] for r in rows}) == 2
    for row in rows:
        assert row["error"] == "" and row["steps"] == "4" and row["stopped_early"] == "False"
        assert 0.0 <= float(row["zero_shot/top1"]) <= 1.0
        # The sampled values, as the trial's own run trained with them.
        ran = load_config(out / "trials" / row["trial"] / "config.yaml")
        assert ran.model.moe.top_k == int(row["model.moe.top_k"]) in (1, 2)
        assert ran.model.moe.temperature == pytest.approx(float(row["model.moe.temperature"]))
        assert 0.5 <= ran.model.moe.temperature <= 2.0
    # At once: each trial started before the other wrote its last line. A trial's start is its
    # last line less its Tune time (its first step is no mark: on 2 cores one trial's 4 steps can
    # end before the other's Ray Train has started).
    spans = [_trial_span(out / "trials" / row["trial"], float(row["seconds"])) for row in rows]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:4] == ["trial", "top_k", "temperature", "zero_shot/top1"]
    assert {line.split()[0] for line in printed[1:]} == {r["trial"] for r in rows}

    best = max(rows, key=lambda r: float(r["zero_shot/top1"]))
    job = load_config(out / "best.yaml")
    assert job.model.moe.top_k == int(best["model.moe.top_k"])
    assert job.model.moe.temperature == pytest.approx(float(best["model.moe.temperature"]))
    assert job.run.name == "tiny-best" and job.train.steps == 4

    with Image.open(out / "sweep.png") as img:
        img.verify()
        assert img.format == "PNG"


def _trial_span(run: Path, seconds: float) -> tuple[float, float]:
    """When the trial started (Tune's seconds to its last report, counted back from its run's
    last metrics line) and when it wrote that line."""
    end = (run / "metrics.jsonl").stat().st_mtime
    return end - seconds, end


def test_the_group_a_trial_ended_mid_run_left_is_freed_and_no_other_trials(ray_local):
    class Expert:
        pass

    class Trial:
        """Stands for a trial's Tune actor: it makes a placement group and an expert actor in
        it, named after its run as distributed/actors.py names them (defined here: a worker
        cannot import a test module)."""

        def start(self, run: str) -> str:
            pg = placement_group([{"CPU": 0.5}], name=f"expertpar-{run}-abcd1234")
            ray.get(pg.ready())
            self.expert = ray.remote(Expert).options(
                name=f"expertpar-{run}-abcd1234-expert0", num_cpus=0.5,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote()
            ray.get(self.expert.__ray_ready__.remote())
            return pg.id.hex()

    trial = ray.remote(Trial).options(num_cpus=0).remote()
    pg = ray.get(trial.start.remote("t_00007"))
    other = placement_group([{"CPU": 0.5}], name="expertpar-t_000070-abcd1234")  # not its own
    ray.get(other.ready())
    ray.kill(trial)  # as Tune ends a stopped trial's actor: its expert dies, its group stays
    try:
        assert release_trial("t_00007") == ["expertpar-t_00007-abcd1234"]
        table = placement_group_table()
        assert table[pg]["state"] == "REMOVED"
        assert table[other.id.hex()]["state"] == "CREATED"
    finally:
        remove_placement_group(other)

"""Metrics as TensorBoard event files: what TensorBoard's own reader finds in a real run's
directory is metrics.jsonl, each step once, also after a resume that replays steps."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from expertpar.app import train
from expertpar.config import ConfigError, config_from_dict
from expertpar.train.metrics import MetricsLog, read_metrics
from expertpar.train.setup import set_aside_previous_run


def _scalars(run_dir):
    """tag -> [(step, value)] as TensorBoard shows them (purges applied)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_steps(path, tag):
    """Every step at which one event file holds ``tag``, repeats included (no purging)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e.step for e in EventFileLoader(str(path)).Load()
            if e.HasField("summary") and any(v.tag == tag for v in e.summary.value)]


def _from_jsonl(run_dir):
    """tag -> [(step, value)] of every number in metrics.jsonl's non-event records."""
    out = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if "event" in r:
            continue
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def test_a_resumed_run_that_replays_steps_reads_back_as_metrics_jsonl_each_step_once(
        synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{
        "train.steps": 4, "train.batch_size": 16, "train.log_every": 1, "train.eval_every": 2,
        "train.checkpoint_every": 2, "data.max_eval_samples": 64})
    train(cfg)
    # As if the process died after logging steps 3 and 4 but before checkpoint 4 was written:
    # the next start resumes from step 2 and runs steps 3 and 4 again.
    ckpts = cfg.run_dir / "checkpoints"
    (ckpts / "latest").write_text("step_000002\n")
    for f in sorted((ckpts / "step_000004").rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    (ckpts / "step_000004").rmdir()
    again = train(cfg)
    assert len(again.losses) == 2

    # Oldest first: by the name's time, then its writer counter, as numbers (the counter is
    # the process's, so by now it may have gone from 9 to 10, which sort before as text).
    files = sorted(cfg.run_dir.glob("events.out.tfevents.*"),
                   key=lambda p: (int(p.name.split(".")[3]), int(p.name.rsplit(".", 1)[1])))
    assert len(files) == 2
    # Steps 3 and 4 are in the event files twice...
    assert _raw_steps(files[0], "loss/total") == [1, 2, 3, 4]
    assert _raw_steps(files[1], "loss/total") == [3, 4]
    # ... and TensorBoard's reader shows each once, exactly what metrics.jsonl holds.
    shown, logged = _scalars(cfg.run_dir), _from_jsonl(cfg.run_dir)
    assert sorted(shown) == sorted(logged)
    assert "zero_shot/top1" in shown and "moe0/image/tokens_expert0" in shown
    for tag, points in logged.items():
        assert [s for s, _ in shown[tag]] == [s for s, _ in points], tag
        assert [v for _, v in shown[tag]] == pytest.approx([v for _, v in points], rel=1e-6,
                                                           nan_ok=True), tag
    assert [s for s, _ in shown["loss/total"]] == [1, 2, 3, 4]
    assert [s for s, _ in shown["zero_shot/top1"]] == [2, 4]


def test_metrics_log_without_tensorboard_writes_no_event_file(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=False)
    log.write({"step": 1, "loss/total": 2.0})
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss/total": 2.0}


def test_event_records_and_non_numbers_are_not_scalars(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    log.write({"step": 0, "event": "start", "data/train_samples": 10})
    log.write({"step": 1, "loss/total": 2.0, "flag": True, "note": "text", "n": 3})
    log.close()
    assert _scalars(tmp_path) == {"loss/total": [(1, 2.0)], "n": [(1, 3.0)]}


def test_no_resume_sets_event_files_and_the_report_aside(tmp_path):
    (tmp_path / "events.out.tfevents.1.host.1.0").write_bytes(b"x")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("old")
    (tmp_path / "config.yaml").write_text("kept")  # not set aside: the new run rewrites it
    aside = set_aside_previous_run(tmp_path)
    assert sorted(p.name for p in aside.iterdir()) == ["events.out.tfevents.1.host.1.0",
                                                       "report"]
    assert {p.name for p in tmp_path.iterdir()} == {aside.name, "config.yaml"}


def test_train_tensorboard_is_on_by_default_and_takes_only_a_bool():
    base = {"data": {"train": "x"}}
    assert config_from_dict(base).train.tensorboard is True
    assert config_from_dict(base, ["train.tensorboard=false"]).train.tensorboard is False
    with pytest.raises(ConfigError, match=r"'train\.tensorboard'.*1"):
        config_from_dict(base, ["train.tensorboard=1"])

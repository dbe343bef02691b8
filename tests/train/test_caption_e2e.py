"""Captioning end to end, in process: a captioning run learns to describe held-out shapes,
`expertpar eval` scores its captions, and `expertpar caption` captions image files (greedy and
beam). (CoCa, objective both, trains in test_dist_faults.py: 2 Ray workers against one
process.)"""
from __future__ import annotations

import json
import random

import pytest
import yaml

from conftest import tiny_config
from expertpar.app import train
from expertpar.app.cli import main
from expertpar.data.synthetic import make_sample
from expertpar.train.metrics import read_metrics

pytestmark = pytest.mark.slow
STEPS = 120


@pytest.fixture(scope="module")
def captioned(synth_dir, tmp_path_factory):
    """A tiny captioning run, evaluated on 100 held-out images."""
    cfg = tiny_config(synth_dir, tmp_path_factory.mktemp("runs"), **{
        "model.objective": "captioning", "train.steps": STEPS, "train.eval_every": 0,
        "train.checkpoint_every": 0, "data.max_eval_samples": 100})
    return cfg, train(cfg)


def test_a_captioning_run_learns_to_caption_held_out_images(captioned):
    cfg, result = captioned
    caption_losses = [m["loss/caption"] for m in _logged(cfg)]
    assert caption_losses[-1] < 0.3 * caption_losses[0], caption_losses
    # An untrained decoder scores 0 (its captions share no 4-gram with the references).
    assert result.eval["caption/bleu4"] > 0.2, result.eval
    assert result.eval["caption/cider"] > 1.0, result.eval
    # Its text tower never trained: no contrastive figures.
    assert not [k for k in result.eval if k.startswith(("zero_shot/", "retrieval/"))]


def test_eval_scores_the_runs_captions_again(captioned, capsys):
    cfg, result = captioned
    assert main(["eval", str(cfg.run_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("caption/bleu4", "caption/cider", "caption/exact_match"):
        assert printed[key] == pytest.approx(result.eval[key]), key


def test_caption_prints_a_caption_per_image_file_greedy_and_beam(captioned, tmp_path, capsys):
    cfg, _ = captioned
    rng, paths = random.Random(7), []
    for i in range(3):
        image, _, _ = make_sample(rng, image_size=32)
        paths.append(tmp_path / f"shape{i}.png")
        image.save(paths[-1])
    for beam in ("1", "3"):
        assert main(["caption", str(cfg.run_dir), *map(str, paths), "--beam", beam]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
        for line in lines:
            caption = line.split("\t")[1].split()
            # The synthetic captions' grammar: "a <size> <colour> <shape> ...".
            assert caption[0] == "a" and caption[1] in ("small", "large"), line


def test_caption_names_what_it_cannot_use(captioned, synth_dir, tmp_path, caplog):
    cfg, _ = captioned
    assert main(["caption", str(cfg.run_dir), str(tmp_path / "absent.png")]) == 2
    assert f"image '{tmp_path / 'absent.png'}' does not exist" in caplog.text
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["caption", str(cfg.run_dir), str(tmp_path / "notes.png")]) == 2
    assert f"image '{tmp_path / 'notes.png'}' cannot be read" in caplog.text
    assert main(["caption", str(cfg.run_dir), str(tmp_path / "notes.png"), "--beam", "0"]) == 2
    assert "--beam 0: must be >= 1" in caplog.text
    # A contrastive run has no decoder: refused before anything loads.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.yaml").write_text(yaml.safe_dump(
        {"data": {"train": str(synth_dir / "train")}}))
    assert main(["caption", str(plain), str(tmp_path / "notes.png")]) == 2
    assert "model.objective is 'contrastive'" in caplog.text


def _logged(cfg):
    return [m for m in read_metrics(cfg.run_dir / "metrics.jsonl") if "loss/caption" in m]

"""``expertpar report`` on a short real run: every figure a real PNG, the page referencing each
by a path relative to it; what a run directory lacks is skipped by name; bad input refused."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest
from PIL import Image

from conftest import tiny_config
from expertpar.app import train
from expertpar.app.cli import main
from expertpar.app.report import evaluate_held_out, write_report

FIGURES = ["loss.png", "eval.png", "expert_load.png", "routing.png", "confusion.png",
           "retrieval.png"]
CURVES, HELD_OUT = FIGURES[:4], FIGURES[4:]


@pytest.fixture(scope="module")
def short_run(synth_dir, tmp_path_factory):
    """6 steps, logged every 2, evaluated at 3 and 6 (64 held-out images), checkpoints 4, 6."""
    cfg = tiny_config(synth_dir, tmp_path_factory.mktemp("report"), **{
        "train.steps": 6, "train.batch_size": 16, "train.log_every": 2, "train.eval_every": 3,
        "train.checkpoint_every": 2, "data.max_eval_samples": 64})
    train(cfg)
    return cfg.run_dir


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def _img_sources(page):
    parser = _Images()
    parser.feed(page.read_text())
    return parser.src


def _assert_real_png(path):
    assert path.stat().st_size > 10_000, (path, path.stat().st_size)
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        assert min(img.size) >= 300, img.size
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 8, path  # drawn, not a blank canvas


def test_the_report_of_a_short_run_writes_every_figure_and_the_page_references_each(
        short_run, capsys):
    assert main(["report", str(short_run), "--examples", "4"]) == 0
    page = short_run / "report" / "index.html"
    assert capsys.readouterr().out.strip() == str(page)
    for name in FIGURES:
        _assert_real_png(short_run / "report" / name)
    # Referenced by file name, beside the page: it opens from disk and the folder travels whole.
    assert _img_sources(page) == FIGURES
    text = page.read_text()
    assert "Skipped" not in text and "<script" not in text


def test_the_confusion_matrix_agrees_with_the_runs_own_zero_shot_accuracy(short_run):
    held = evaluate_held_out(short_run, None, 3)
    run = json.loads((short_run / "eval.json").read_text())
    assert held.step == run["step"] == 6 and held.samples == run["zero_shot/samples"] == 64
    counts = held.confusion
    assert len(counts) == len(held.classes) == 16
    top1 = sum(counts[i][i] for i in range(16)) / sum(map(sum, counts))
    assert top1 == pytest.approx(run["zero_shot/top1"], abs=1e-6)
    # Three images spread over the split, each with three distinct captions, best first.
    assert len(held.examples) == 3
    for ex in held.examples:
        captions, sims = [c for c, _ in ex.top], [s for _, s in ex.top]
        assert len(set(captions)) == 3 and sims == sorted(sims, reverse=True)


def test_a_run_without_a_checkpoint_gets_its_curves_and_the_page_says_what_was_skipped(
        short_run, tmp_path):
    for name in ("metrics.jsonl", "config.yaml"):
        shutil.copy(short_run / name, tmp_path / name)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "confusion.png").write_bytes(b"stale")
    report = write_report(tmp_path)
    assert [p.name for p in report.figures] == CURVES
    assert sorted(report.skipped) == sorted(HELD_OUT)
    assert all(f"no checkpoint in {tmp_path / 'checkpoints'}" in why
               for why in report.skipped.values())
    # The page shows the curves, names each skipped figure and why, and no stale figure stays.
    assert _img_sources(report.page) == CURVES
    text = report.page.read_text()
    assert all(name in text for name in HELD_OUT) and "no checkpoint in" in text
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        CURVES + ["index.html"])


def test_a_metrics_line_that_is_not_json_skips_the_curves_naming_the_line(short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("report"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + ['{"step": 4, "loss/to']) + "\n")
    report = write_report(run, examples=2)
    assert [p.name for p in report.figures] == HELD_OUT
    assert sorted(report.skipped) == sorted(CURVES)
    assert all(f"{run / 'metrics.jsonl'}:4 is not JSON" in why for why in report.skipped.values())


@pytest.mark.parametrize("args, expected", [
    (["{missing}"], "run directory '{missing}' not found"),
    (["{empty}"], "nothing to report from '{empty}': {empty}/metrics.jsonl not found; "
                  "{empty}/config.yaml not found"),
    (["{empty}", "--examples", "0"], "--examples must be >= 1, got 0"),
    (["{empty}", "--data", "{missing}"], "--data '{missing}' not found"),
])
def test_bad_input_is_refused_naming_it(tmp_path, capsys, args, expected):
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty"}
    paths["empty"].mkdir()
    assert main(["report", *[a.format(**paths) for a in args]]) == 2
    err = capsys.readouterr().err
    assert "expertpar report: error: " + expected.format(**paths) in err, err
    assert not (paths["empty"] / "report").exists()  # nothing written

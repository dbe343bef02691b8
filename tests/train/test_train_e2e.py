"""End to end, in process, on synthetic data: learning, resume, bad samples, the CLI."""
from __future__ import annotations

import io
import json
import math
import random

import pytest

from conftest import tiny_config
from expertpar.app.cli import main
from expertpar.data import RawSample, iter_samples, write_webdataset
from expertpar.app import train
from expertpar.train.metrics import read_metrics


@pytest.mark.slow
def test_loss_falls_zero_shot_beats_chance_and_the_routers_decide_evenly(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{"train.steps": 200, "train.eval_every": 0})
    result = train(cfg)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    chance = result.eval["zero_shot/chance_top1"]
    assert chance == pytest.approx(1 / 16)
    # Well above chance: at least 3x on 400 held-out images.
    assert result.eval["zero_shot/top1"] > 3 * chance, result.eval
    assert result.eval["retrieval/image_to_text/R@10"] > 0.3, result.eval
    # Routing statistics reach the metrics.
    assert "eval/moe0/image/tokens_expert0" in result.eval
    for name in ("metrics.jsonl", "eval.json", "tokenizer.json", "config.yaml",
                 "checkpoints/latest"):
        assert (cfg.run_dir / name).exists(), name
    # With the default LIMoE entropy losses the gates decide (flat ones sit at ln 4 = 1.386;
    # these end at 0.92, against 1.29 without the losses) while the experts stay evenly
    # loaded in each modality (most loaded / mean 1.29 and 1.10): over the last 5 logs, a
    # looser bound than README's 0.5 ln E, which longer runs meet.
    tail = [m for m in read_metrics(cfg.run_dir / "metrics.jsonl") if "loss/total" in m][-5:]
    entropy = sum(m["moe0/router_entropy"] for m in tail) / len(tail)
    assert entropy <= 0.75 * math.log(4), entropy
    for modality in ("image", "text"):
        kept = [sum(m[f"moe0/{modality}/tokens_expert{e}"] for m in tail) for e in range(4)]
        assert max(kept) <= 1.5 * sum(kept) / 4, (modality, kept)


def test_resume_matches_uninterrupted_run(synth_dir, tmp_path):
    full = train(tiny_config(synth_dir, tmp_path / "a"))
    cfg_b = tiny_config(synth_dir, tmp_path / "b")
    first = train(cfg_b, stop_after=10)
    assert first.steps_done == 10
    second = train(cfg_b)
    assert len(second.losses) == 10
    assert first.losses + second.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    # The metrics file holds each step once, as if the run had never stopped.
    def logged(run_dir):
        return [(r["step"], r["loss/total"]) for r in read_metrics(run_dir / "metrics.jsonl")
                if "loss/total" in r]
    assert [s for s, _ in logged(cfg_b.run_dir)] == [5, 10, 15, 20]
    assert [s for s, _ in logged(full.run_dir)] == [5, 10, 15, 20]
    assert [v for _, v in logged(cfg_b.run_dir)] == pytest.approx(
        [v for _, v in logged(full.run_dir)], rel=1e-6)


def test_resume_with_noisy_gating_and_top2(synth_dir, tmp_path):
    over = {"model.moe.noise_std": 0.5, "model.moe.top_k": 2, "train.steps": 12,
            "train.checkpoint_every": 6}
    full = train(tiny_config(synth_dir, tmp_path / "a", **over))
    cfg_b = tiny_config(synth_dir, tmp_path / "b", **over)
    a = train(cfg_b, stop_after=6).losses
    b = train(cfg_b).losses
    assert a + b == pytest.approx(full.losses, rel=1e-6, abs=1e-7)


def _png(color) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_and_counted(synth_dir, tmp_path):
    good = list(iter_samples(synth_dir / "train"))[:60]
    bad = [
        RawSample("bad_corrupt", b"\x89PNG\r\n\x1a\nnot really a png", "png", "a red circle", {}),
        RawSample("bad_empty", _png((200, 0, 0)), "png", "   ", {}),
        RawSample("bad_missing", _png((0, 200, 0)), "png", None, {}),
    ]
    samples = good[:30] + bad + good[30:]
    random.Random(0).shuffle(samples)
    write_webdataset(samples, tmp_path / "shards", shard_size=1000)
    cfg = tiny_config(synth_dir, tmp_path / "run", **{"data.train": str(tmp_path / "shards"),
                                                      "train.steps": 4})
    result = train(cfg)
    assert result.steps_done == 4
    start = read_metrics(cfg.run_dir / "metrics.jsonl")[0]
    assert start["data/skipped/total"] == 3
    assert start["data/skipped/corrupt_image"] == 1
    assert start["data/skipped/empty_caption"] == 1
    assert start["data/skipped/missing_caption"] == 1
    assert start["data/train_samples"] == 60


def test_cli_train_eval_and_errors(synth_dir, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    cfg = tiny_config(synth_dir, tmp_path)
    from expertpar.config import dump_config
    job.write_text(dump_config(cfg))
    assert main(["train", str(job), "--set", "train.steps=6", "--set",
                 "model.moe.num_experts=8"]) == 0
    err = capsys.readouterr().err  # progress and set-up lines are log lines, on stderr
    assert "run directory:" in err and "step      6/6" in err
    saved = (cfg.run_dir / "config.yaml").read_text()
    assert "num_experts: 8" in saved
    assert main(["eval", str(cfg.run_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 6 and "zero_shot/top1" in metrics
    # Bad input: a clear error naming the key, exit code 2, nothing written.
    assert main(["train", str(job), "--set", "model.moe.top_k=9"]) == 2
    assert "model.moe.top_k" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    # A run directory whose checkpoints are all unusable: named, no traceback.
    (cfg.run_dir / "checkpoints" / "step_000006" / "dense.safetensors").write_bytes(b"torn")
    assert main(["eval", str(cfg.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "dense.safetensors" in err and "Traceback" not in err


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "expertpar", "data", "synth", "--out",
                          str(tmp_path / "d"), "--n", "20"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "d" / "dataset.json").exists()


def test_quiet_keeps_only_warnings_and_the_result(synth_dir, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    from expertpar.config import dump_config
    job.write_text(dump_config(tiny_config(synth_dir, tmp_path, **{"train.steps": 2})))
    assert main(["--quiet", "train", str(job)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "step" not in err and "run directory" not in err
    assert main(["train", str(job), "--set", "train.steps=3"]) == 0  # the level is per call
    assert "step      3/3" in capsys.readouterr().err


def test_resuming_a_finished_run_trains_nothing_and_fewer_steps_are_refused(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2})
    train(cfg)
    again = train(cfg)
    assert again.steps_done == 4 and again.losses == []
    with pytest.raises(ValueError, match=r"train\.steps.*below the step of the checkpoint"):
        train(tiny_config(synth_dir, tmp_path, **{"train.steps": 3}))


def test_an_eval_split_indexed_in_memory_still_evaluates(synth_dir, tmp_path, monkeypatch):
    # A held-out split whose directory cannot hold the index (here a file is in the way) and no
    # EXPERTPAR_CACHE_DIR: the index stays in memory, and the loop evaluates on it.
    import shutil
    evald = tmp_path / "eval"
    shutil.copytree(synth_dir / "test", evald, ignore=shutil.ignore_patterns(".expertpar-index"))
    (evald / ".expertpar-index").write_text("in the way")
    monkeypatch.delenv("EXPERTPAR_CACHE_DIR", raising=False)
    cfg = tiny_config(synth_dir, tmp_path, **{"data.eval": str(evald), "train.steps": 2})
    result = train(cfg)
    assert result.eval["eval/samples"] == 400

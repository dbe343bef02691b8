"""Checkpoints: atomic, verified, topology-free names, and safe to resume from."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import tiny_config
from expertpar.app import train
from expertpar.config import dump_config
from expertpar.train.checkpoint import (CheckpointError, latest_checkpoint, read_shards, verify,
                                        write_checkpoint)
from expertpar.train.loop import dense_owner
from expertpar.train.names import model_entries
from expertpar.train.setup import build_model, check_resumable


def _model_and_owner(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path)
    model = build_model(cfg, 64)
    owner = dense_owner(model, cfg)
    # One real step so the optimizer has state to save.
    loss = sum(p.square().sum() for p in model.parameters())
    loss.backward()
    owner.step(1e-3, 1.0)
    return cfg, model, owner


def test_shards_are_named_by_layer_and_expert(synth_dir, tmp_path):
    cfg, model, owner = _model_and_owner(synth_dir, tmp_path)
    files = {slot.file for slot, _ in model_entries(model)}
    assert files == {"dense.safetensors", "router.safetensors"} | {
        f"experts/L0_E{e}.safetensors" for e in range(4)}
    shards = owner.export()
    assert set(shards["router.safetensors"]) == {
        "moe0.gate.w_ED", "moe0.gate.w_ED::exp_avg", "moe0.gate.w_ED::exp_avg_sq",
        "moe0.gate.w_ED::step"}
    assert set(shards["experts/L0_E2.safetensors"]) >= {"fc1.weight", "fc2.bias::exp_avg"}


def test_round_trip_restores_parameters_and_optimizer_state(synth_dir, tmp_path):
    cfg, model, owner = _model_and_owner(synth_dir, tmp_path)
    path = write_checkpoint(tmp_path / "ck", 1, owner.export(), train_state={},
                            text_files={"config.yaml": "x: 1\n"})
    fresh = build_model(cfg, 64)
    fresh_owner = dense_owner(fresh, cfg)
    fresh_owner.load(read_shards(path), where=str(path))
    opt, fresh_opt = owner.optimizer, fresh_owner.optimizer
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][k], fresh_opt.state[b][k]), (n, k)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(synth_dir, tmp_path, caplog):
    cfg, model, owner = _model_and_owner(synth_dir, tmp_path)
    root = tmp_path / "ck"
    write_checkpoint(root, 1, owner.export(), train_state={}, text_files={})
    newest = write_checkpoint(root, 2, owner.export(), train_state={},
                              text_files={})
    assert latest_checkpoint(root) == newest
    (newest / "dense.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="dense.safetensors"):
        verify(newest)
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        assert latest_checkpoint(root).name == "step_000001"
    assert "dense.safetensors" in caplog.text
    # A write that died before the rename leaves only a temporary directory: ignored.
    (root / ".tmp-step_000003-999").mkdir()
    assert latest_checkpoint(root).name == "step_000001"


def test_keep_prunes_old_checkpoints_but_never_the_latest(synth_dir, tmp_path):
    cfg, model, owner = _model_and_owner(synth_dir, tmp_path)
    root = tmp_path / "ck"
    for step in (1, 2, 3):
        write_checkpoint(root, step, owner.export(), train_state={},
                         text_files={}, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000003"]
    assert not list(root.glob(".tmp-*"))


def test_no_resume_sets_the_earlier_run_aside(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2})
    train(cfg)
    again = tiny_config(synth_dir, tmp_path, **{"train.steps": 2, "train.checkpoint_every": 2})
    result = train(again, resume=False)
    assert result.steps_done == 2 and len(result.losses) == 2
    aside = list(cfg.run_dir.glob("replaced-*"))
    assert len(aside) == 1
    assert (aside[0] / "checkpoints" / "step_000004" / "manifest.json").exists()
    assert latest_checkpoint(cfg.run_dir / "checkpoints").name == "step_000002"
    steps = [json.loads(l).get("step") for l in
             (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_top_k_shapes_a_dense_checkpoint_and_only_routes_in_a_moe_one(synth_dir, tmp_path):
    ckpt = tmp_path / "step_000002"
    ckpt.mkdir()
    for variant in ("dense", "moe"):
        saved = tiny_config(synth_dir, tmp_path, **{"model.variant": variant,
                                                    "model.moe.top_k": 2})
        (ckpt / "config.yaml").write_text(dump_config(saved))
        now = tiny_config(synth_dir, tmp_path, **{"model.variant": variant})  # top_k 1
        if variant == "moe":
            check_resumable(now, ckpt)  # routes 1 expert a token instead of 2: resumable
        else:  # FFNs of 2 x 64 units there, 1 x 64 here
            with pytest.raises(CheckpointError, match="model.moe.top_k 2 there, 1 now"):
                check_resumable(now, ckpt)


def test_batchnorm_statistics_of_the_cnn_stem_are_saved(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{"model.stem": "cnn"})
    model = build_model(cfg, 64)
    owner = dense_owner(model, cfg)
    model.train()
    model.encode(torch.randn(4, 3, 32, 32) * 3 + 1)  # moves the running statistics
    path = write_checkpoint(tmp_path / "ck", 1, owner.export(), train_state={},
                            text_files={})
    fresh = build_model(cfg, 64)
    dense_owner(fresh, cfg).load(read_shards(path), where=str(path), optimizer_state=False)
    for (n, a), (_, b) in zip(model.named_buffers(), fresh.named_buffers()):
        assert torch.equal(a, b), n
    assert any("running_mean" in n for n, _ in model.named_buffers())


def test_a_checkpoint_of_another_model_is_refused_listing_every_difference(synth_dir,
                                                                           tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{"train.steps": 2, "train.checkpoint_every": 2})
    train(cfg)
    ckpt = latest_checkpoint(cfg.run_dir / "checkpoints")
    before = sorted(p.name for p in cfg.run_dir.rglob("*"))
    other = tiny_config(synth_dir, tmp_path, **{"train.steps": 4, "model.dim": 48,
                                                "model.moe.num_experts": 2,
                                                "model.moe.activation": "relu",
                                                "model.moe.capacity_factor": 2.0})
    with pytest.raises(CheckpointError) as err:
        train(other)
    message = str(err.value)
    assert f"checkpoint {ckpt} was written by a model this config does not describe" in message
    assert ("model.dim 32 there, 48 now; model.moe.num_experts 4 there, 2 now; "
            "model.moe.activation 'gelu' there, 'relu' now." in message)
    assert "capacity_factor" not in message  # a key that may change on resume
    assert "--no-resume" in message
    assert sorted(p.name for p in cfg.run_dir.rglob("*")) == before  # nothing written
    # A key that does not shape the parameters may change: the run resumes.
    again = tiny_config(synth_dir, tmp_path, **{"train.steps": 4,
                                                "model.moe.capacity_factor": 2.0})
    assert train(again).steps_done == 4


# The child: trains like the parent's run, but its checkpoint writer dies (os._exit, no
# clean-up, no finally) right after the first tensor file of the step-CRASH_AT checkpoint.
_CRASHING_RUN = """
import os, sys
from safetensors.torch import save_file as real_save_file
import expertpar.train.checkpoint as checkpoint
from expertpar.app import train
from expertpar.config import load_config

def save_file(tensors, path, *args, **kwargs):
    real_save_file(tensors, path, *args, **kwargs)
    if "step_%06d" % int(sys.argv[2]) in path:  # wherever the writer puts that step
        os._exit(9)

checkpoint.save_file = save_file
train(load_config(sys.argv[1]))
sys.exit("the run finished: the writer never crashed")
"""


def test_a_crash_mid_checkpoint_resumes_from_the_previous_one(synth_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from expertpar.config import dump_config
    from expertpar.train.metrics import read_metrics
    over = {"train.steps": 10, "train.checkpoint_every": 4, "train.log_every": 1,
            "data.max_eval_samples": 64}
    full = train(tiny_config(synth_dir, tmp_path / "ref", **over))
    cfg = tiny_config(synth_dir, tmp_path / "crash", **over)
    job = tmp_path / "job.yaml"
    job.write_text(dump_config(cfg))
    script = tmp_path / "crashing_run.py"
    script.write_text(_CRASHING_RUN)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [repo] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    child = subprocess.run([sys.executable, str(script), str(job), "8"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 9, child.stderr[-3000:]

    root = cfg.run_dir / "checkpoints"
    # The crash came after one tensor file of step 8, which lies in a temporary directory
    # with no manifest: a step_ directory appears only when complete.
    partial = list(root.glob(".tmp-step_000008-*"))
    assert len(partial) == 1, sorted(p.name for p in root.iterdir())
    assert len([p for p in partial[0].rglob("*.safetensors")]) == 1
    assert not (partial[0] / "manifest.json").exists()
    assert not (root / "step_000008").exists()
    assert (root / "latest").read_text().strip() == "step_000004"
    previous = latest_checkpoint(root)
    assert previous == root / "step_000004"
    assert verify(previous)["step"] == 4

    resumed = train(cfg)
    # Lost: steps 5..8, at most the checkpoint interval; the run goes on from step 4 to 10.
    assert resumed.steps_done == 10 and len(resumed.losses) == 10 - 4
    assert resumed.losses == full.losses[4:]  # bit for bit on CPU
    assert latest_checkpoint(root).name == "step_000010"
    assert not list(root.glob(".tmp-*"))  # the crashed writer's leftovers are swept
    # metrics.jsonl: the crashed attempt's steps 5..8 replaced, each step once, as if the
    # run had never crashed.
    def losses(run_dir):
        return [(r["step"], r["loss/total"]) for r in read_metrics(run_dir / "metrics.jsonl")
                if "loss/total" in r]
    assert losses(cfg.run_dir) == losses(full.run_dir)
    assert [s for s, _ in losses(cfg.run_dir)] == list(range(1, 11))
    starts = [r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl")
              if r.get("event") == "start"]
    assert starts == [0, 4]


class _RunsCode:
    """Unpickling this makes a directory: proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.mkdir, (self.marker,)


def test_checkpoints_are_read_without_unpickling(synth_dir, tmp_path, monkeypatch):
    import hashlib
    import pickle

    from expertpar.app.evaluate import evaluate_run
    small = {"train.checkpoint_every": 2, "data.max_eval_samples": 64}
    cfg = tiny_config(synth_dir, tmp_path, **{"train.steps": 2, **small})
    train(cfg)

    # With every unpickler gone, a run still resumes from its checkpoint and evaluates it.
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")
    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    more = tiny_config(synth_dir, tmp_path, **{"train.steps": 4, **small})
    assert len(train(more).losses) == 2
    assert evaluate_run(cfg.run_dir)["step"] == 4
    monkeypatch.undo()

    # A tensor file replaced by a pickle (as torch.save writes), its checksum in the manifest
    # updated too: refused as not safetensors, and the pickle's code never runs.
    ckpt = latest_checkpoint(cfg.run_dir / "checkpoints")
    marker = tmp_path / "unpickled"
    bad = pickle.dumps({"w": _RunsCode(str(marker))})
    (ckpt / "dense.safetensors").write_bytes(bad)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["dense.safetensors"] = hashlib.sha256(bad).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert latest_checkpoint(cfg.run_dir / "checkpoints") == ckpt  # it verifies
    with pytest.raises(Exception, match="deserializing header"):
        train(tiny_config(synth_dir, tmp_path, **{"train.steps": 6, **small}))
    with pytest.raises(Exception, match="deserializing header"):
        evaluate_run(cfg.run_dir)
    assert not marker.exists()

"""A NaN or inf loss or gradient: the step is skipped by every owner and counted; too many in a
row stop the run with a clear error, keeping the checkpoint from before the first of them."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from expertpar.app import train
from expertpar.train import step as step_module
from expertpar.train.checkpoint import latest_checkpoint, read_shards, read_train_state
from expertpar.train.loop import NonFiniteSteps
from expertpar.train.metrics import read_metrics


def _poison(monkeypatch, bad_calls):
    """The loss of the training steps whose call index (0-based) is in ``bad_calls`` is NaN."""
    real, calls = step_module.clip_loss, []

    def clip_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(len(calls))
        return loss * float("nan") if calls[-1] in bad_calls else loss
    monkeypatch.setattr(step_module, "clip_loss", clip_loss)


def _last_step_record(run_dir) -> dict:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss/total" in m][-1]


def test_a_nan_step_changes_no_parameter_and_no_optimizer_state(synth_dir, tmp_path,
                                                                 monkeypatch):
    over = {"train.steps": 4, "train.checkpoint_every": 0}
    clean = train(tiny_config(synth_dir, tmp_path / "clean", **over), stop_after=3)
    _poison(monkeypatch, {3})
    poisoned = train(tiny_config(synth_dir, tmp_path / "nan", **over))
    assert poisoned.steps_done == 4
    # After 3 good steps and a skipped one, every tensor — dense, gates, experts, their AdamW
    # moments and step counts — is what 3 good steps left.
    a = read_shards(latest_checkpoint(clean.run_dir / "checkpoints"))
    b = read_shards(latest_checkpoint(poisoned.run_dir / "checkpoints"))
    assert sorted(a) == sorted(b)
    for file in a:
        assert sorted(a[file]) == sorted(b[file]), file
        for key in a[file]:
            assert torch.equal(a[file][key], b[file][key]), (file, key)
    last = _last_step_record(poisoned.run_dir)
    assert last["step"] == 4 and last["optim/skipped_total"] == 1


def test_an_isolated_bad_step_is_counted_and_the_run_goes_on(synth_dir, tmp_path,
                                                             monkeypatch, caplog):
    _poison(monkeypatch, {6})
    result = train(tiny_config(synth_dir, tmp_path, **{"train.steps": 12}))
    assert result.steps_done == 12
    assert [i for i, loss in enumerate(result.losses) if loss != loss] == [6]
    assert result.losses[-1] < result.losses[0]  # it kept learning
    assert "step 7: the loss or a gradient is NaN or inf" in caplog.text
    assert _last_step_record(result.run_dir)["optim/skipped_total"] == 1


def test_too_many_in_a_row_stop_the_run_keeping_the_checkpoint_from_before(synth_dir,
                                                                          tmp_path,
                                                                          monkeypatch):
    cfg = tiny_config(synth_dir, tmp_path, **{"train.checkpoint_every": 2,
                                              "train.max_skipped_in_a_row": 3})
    _poison(monkeypatch, set(range(5, 100)))  # from step 6 on, every loss is NaN
    with pytest.raises(NonFiniteSteps) as err:
        train(cfg)
    ckpt = latest_checkpoint(cfg.run_dir / "checkpoints")
    assert read_train_state(ckpt)["step"] == 4  # steps 6 and 8 wrote none
    message = str(err.value)
    assert "steps 6..8: 3 in a row had a NaN or inf loss or gradient" in message, message
    assert "train.max_skipped_in_a_row=3" in message
    assert f"from before the first of them is {ckpt}" in message

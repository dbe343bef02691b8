"""A training source that has no usable sample, or is not there, stops `expertpar train` before
training with an error naming it: exit code 2, no traceback."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from shard_helpers import add_member

from expertpar.app.cli import main
from expertpar.config import config_from_dict, dump_config


def _job(tmp_path: Path, train: Path) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(dump_config(config_from_dict({"data": {"train": str(train)},
                                                 "run": {"out_dir": str(tmp_path / "runs")}})))
    return job


@pytest.mark.parametrize("content", ["no members", "only bad samples"])
def test_a_source_without_usable_samples_is_refused_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture, content: str) -> None:
    shard = tmp_path / "empty" / "000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        if content == "only bad samples":
            add_member(tar, "a.png", b"not a png")
            add_member(tar, "a.txt", b"a caption")
    assert main(["train", str(_job(tmp_path, shard.parent))]) == 2
    err = capsys.readouterr().err
    assert f"data.train '{shard.parent}' has 0 usable samples" in err
    assert "Traceback" not in err


def test_a_training_source_that_does_not_exist_is_refused_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(_job(tmp_path, tmp_path / "nowhere"))]) == 2
    err = capsys.readouterr().err
    assert f"data source not found: {tmp_path / 'nowhere'}" in err and "Traceback" not in err

"""Ray Data streaming: the index built in Ray tasks, and each worker's stream equal bit for bit
to the in-process make_batch of its slice, from a non-zero (resumed) start step."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray
import torch
from shard_helpers import write_messy_shard

from conftest import tiny_config
from expertpar.data import (SampleIndex, make_batch, make_transform, train_tokenizer,
                            worker_indices, write_synthetic)
from expertpar.distributed.data import (build_index_on_ray, dataset_name, iter_worker_batches,
                                        train_datasets)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cpus():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = write_synthetic(tmp_path_factory.mktemp("raydata"), n_train=50, n_test=4, seed=4,
                          shard_size=15)
    write_messy_shard(out / "train" / "shard-00009.tar")
    return out


def test_index_built_in_ray_tasks_equals_in_process(ray_cpus, data_dir: Path, tmp_path: Path) -> None:
    # A copy, so the in-process build below cannot just find the Ray-built cache.
    copy = tmp_path / "train"
    shutil.copytree(data_dir / "train", copy)
    on_ray = build_index_on_ray(str(data_dir / "train"), max_samples=40)
    local = SampleIndex.build(str(copy), max_samples=40)
    assert len(on_ray) == len(local) == 40 and on_ray.skipped.counts == local.skipped.counts
    assert list(on_ray.captions) == list(local.captions) and list(on_ray.keys) == list(local.keys)
    assert len(SampleIndex.build(str(data_dir / "train"))) == 56  # 50 + the messy shard's 6


def test_worker_streams_equal_in_process_batches_from_a_resumed_step(ray_cpus, data_dir: Path,
                                                                    tmp_path: Path) -> None:
    cfg = tiny_config(data_dir, tmp_path, **{
        "distributed.backend": "ray", "distributed.num_workers": 2, "train.batch_size": 8,
        "data.max_train_samples": 45, "data.hflip": True})
    index = build_index_on_ray(cfg.data.train, max_samples=cfg.data.max_train_samples)
    tokenizer = train_tokenizer(index.captions, 128)
    start, end = 3, 8  # 5 steps per epoch of 45 samples: the stream crosses an epoch
    datasets = train_datasets(index.location, cfg, tokenizer.to_str(), start=start, end=end)
    assert sorted(datasets) == [dataset_name(0), dataset_name(1)] == ["train_rank0", "train_rank1"]
    transform = make_transform(cfg.data.image_size, train=True, hflip=True)
    for rank in range(2):
        got = list(iter_worker_batches(datasets[dataset_name(rank)].iterator(), cfg, world=2))
        assert [b.step for b in got] == list(range(start, end))
        for batch in got:
            want = make_batch(index, worker_indices(len(index), 8, seed=cfg.run.seed, step=batch.step,
                                                    rank=rank, world=2),
                              step=batch.step, seed=cfg.run.seed, transform=transform,
                              tokenizer=tokenizer, context_length=cfg.tokenizer.context_length)
            assert batch.images_BCHW.shape == (4, 3, cfg.data.image_size, cfg.data.image_size)
            assert torch.equal(batch.images_BCHW, want.images_BCHW), (rank, batch.step)
            assert torch.equal(batch.ids_BL, want.ids_BL) and torch.equal(batch.mask_BL, want.mask_BL)


def test_too_few_samples_fail_in_the_driver(ray_cpus, data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_dir, tmp_path, **{"train.batch_size": 64})
    index = SampleIndex.build(cfg.data.train)
    with pytest.raises(ValueError, match="fewer than batch_size 64"):
        train_datasets(index.location, cfg, "{}", start=0, end=2)


def test_what_ray_trains_controller_and_ray_datas_coordinators_unpickle_loads_no_torch(
        ray_cpus, data_dir: Path, tmp_path: Path) -> None:
    """Ray Train's controller unpickles the worker function and its payload, and Ray Data's
    coordinating actors the workers' datasets, on every start and recovery of a job: none of
    it may pull in torch, the model, the loop or the data pipeline (seconds of CPU each, on
    every restart; the controller gets torch anyway from Ray's own TorchConfig)."""
    import subprocess
    import sys

    import ray.cloudpickle as cloudpickle

    from expertpar.distributed.entry import WorkerPayload, train_worker
    from expertpar.train.setup import open_run, prepare_run

    cfg = tiny_config(data_dir, tmp_path, **{"distributed.backend": "ray",
                                             "distributed.num_workers": 2})
    spec, _, _ = prepare_run(cfg, open_run(cfg, resume=False), stop_after=None)
    blob = tmp_path / "unpickled.pkl"
    blob.write_bytes(cloudpickle.dumps((
        train_worker, WorkerPayload(spec, [], None),
        train_datasets(spec.train_location, cfg, spec.tokenizer_json, start=0, end=2))))
    out = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read()); "
         "print(' '.join(sorted(sys.modules)))", str(blob)],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split()
    assert "expertpar.distributed.entry" in loaded and "expertpar.distributed.prepare" in loaded
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "torchvision", "tokenizers")
             or m.startswith(("expertpar.model", "expertpar.train.loop",
                              "expertpar.distributed.runtime"))]
    assert not heavy, heavy

"""Training batches: worker slices, make_batch, train_batches, and the worker stream's checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from expertpar.data import (Batch, ImageTextDataset, SampleIndex, batch_indices, combine_seed,
                            encode_captions, make_batch, make_transform, train_batches,
                            train_tokenizer, worker_indices, write_synthetic)
from expertpar.distributed.data import iter_worker_batches


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("batch"), n_train=40, n_test=8, seed=1,
                           shard_size=16)


@pytest.fixture(scope="module")
def index(data_dir: Path) -> SampleIndex:
    return SampleIndex.build(str(data_dir / "train"))


@pytest.fixture(scope="module")
def tokenizer(index: SampleIndex):
    return train_tokenizer(index.captions, 128)


def test_worker_slices_partition_the_global_batch() -> None:
    for step in (0, 3, 7):
        full = batch_indices(23, 6, seed=5, step=step)
        parts = [worker_indices(23, 6, seed=5, step=step, rank=r, world=3) for r in range(3)]
        assert [i for p in parts for i in p] == full and all(len(p) == 2 for p in parts)
    assert worker_indices(23, 6, seed=5, step=2) == batch_indices(23, 6, seed=5, step=2)
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 workers"):
        worker_indices(23, 6, seed=5, step=0, rank=0, world=4)
    with pytest.raises(ValueError, match="rank must be in"):
        worker_indices(23, 6, seed=5, step=0, rank=3, world=3)


def test_make_batch_is_the_train_loops_recipe(index: SampleIndex, tokenizer) -> None:
    tf = make_transform(32, train=True)
    idx = [5, 0, 17, 39]
    batch = make_batch(index, idx, step=9, seed=4, transform=tf, tokenizer=tokenizer, context_length=12)
    images, captions, _ = index.batch(idx, tf, seed=combine_seed(4, 9))
    ids, mask = encode_captions(tokenizer, captions, 12)
    assert batch.step == 9 and torch.equal(batch.images_BCHW, images)
    assert torch.equal(batch.ids_BL, ids) and torch.equal(batch.mask_BL, mask)
    assert batch.images_BCHW.dtype == torch.float32 and batch.ids_BL.dtype == torch.int64
    assert batch.mask_BL.dtype == torch.bool and batch.ids_BL.shape == (4, 12)
    other = make_batch(index, idx, step=10, seed=4, transform=tf, tokenizer=tokenizer, context_length=12)
    assert not torch.equal(other.images_BCHW, batch.images_BCHW)  # new step, new augmentation
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved.step == 9 and torch.equal(moved.ids_BL, batch.ids_BL)
    # The in-memory dataset gives the same batch: both follow one contract.
    loaded = ImageTextDataset.load(Path(index.source))
    same = make_batch(loaded, idx, step=9, seed=4, transform=tf, tokenizer=tokenizer, context_length=12)
    assert torch.equal(same.images_BCHW, batch.images_BCHW)


def test_train_batches_resume_and_split_over_workers(index: SampleIndex, tokenizer, data_dir,
                                                     tmp_path: Path) -> None:
    cfg = tiny_config(data_dir, tmp_path, **{"train.batch_size": 8})
    tf = make_transform(cfg.data.image_size, train=True, hflip=cfg.data.hflip)
    whole = list(train_batches(index, cfg, tokenizer, start=0, end=7))  # 5 steps per epoch: crosses one
    assert [b.step for b in whole] == list(range(7))
    for b in whole:
        want = make_batch(index, batch_indices(40, 8, seed=cfg.run.seed, step=b.step), step=b.step,
                          seed=cfg.run.seed, transform=tf, tokenizer=tokenizer,
                          context_length=cfg.tokenizer.context_length)
        assert torch.equal(b.images_BCHW, want.images_BCHW) and torch.equal(b.ids_BL, want.ids_BL)
    resumed = list(train_batches(index, cfg, tokenizer, start=4, end=7))
    assert all(torch.equal(a.images_BCHW, b.images_BCHW) for a, b in zip(resumed, whole[4:]))
    # Two workers' halves are the rows of the one-worker batch: augmentation is per sample.
    halves = [list(train_batches(index, cfg, tokenizer, start=2, end=4, rank=r, world=2)) for r in range(2)]
    for k, step in enumerate((2, 3)):
        joined = torch.cat([halves[0][k].images_BCHW, halves[1][k].images_BCHW])
        assert torch.equal(joined, whole[step].images_BCHW)


class _FakeIterator:
    """Stands in for a ray.data DataIterator: yields prepared numpy batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = batches

    def iter_batches(self, **_kwargs):
        yield from self.batches


def _rows(steps: list[int]) -> dict[str, np.ndarray]:
    n = len(steps)
    return {"step": np.array(steps), "images": np.zeros((n, 3, 4, 4), np.float32),
            "ids": np.ones((n, 5), np.int64), "mask": np.ones((n, 5), bool)}


def test_worker_stream_yields_steps_in_order_and_refuses_mixed_batches(data_dir, tmp_path) -> None:
    cfg = tiny_config(data_dir, tmp_path, **{"train.batch_size": 4})
    good = list(iter_worker_batches(_FakeIterator([_rows([5, 5]), _rows([6, 6])]), cfg, world=2))
    assert [b.step for b in good] == [5, 6] and good[0].mask_BL.dtype == torch.bool
    assert good[0].images_BCHW.shape == (2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"steps \[5, 6\]"):
        list(iter_worker_batches(_FakeIterator([_rows([5, 6])]), cfg, world=2))
    with pytest.raises(RuntimeError, match="1 rows"):
        list(iter_worker_batches(_FakeIterator([_rows([5])]), cfg, world=2))
    with pytest.raises(RuntimeError, match="step 7 arrived where step 6 was due"):
        list(iter_worker_batches(_FakeIterator([_rows([5, 5]), _rows([7, 7])]), cfg, world=2))

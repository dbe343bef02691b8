"""Ray Data ingestion: the same per-sample functions as the in-process path, run by Ray.

1. ``load_split`` reads shards (or a manifest) in parallel Ray tasks, one per file, validating
   every sample with ``to_stored`` (bad ones are counted, never fatal), in file order.
2. ``worker_stream`` gives one train worker its slice of every global batch: a Ray Dataset of
   (step, sample index) rows whose ``map_batches`` decodes, augments (seeded by step and index)
   and tokenises with the functions the in-process loop uses, so both paths see identical
   batches. Rows stay in order (``preserve_order``), one batch per step.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import ray
import torch

from ..data import (ImageTextDataset, SampleError, SkipStats, StoredSample, batch_indices,
                    combine_seed, encode_captions, find_dataset_info, iter_samples, list_shards,
                    make_transform)
from ..data.dataset import sample_tensor, to_stored


def _read_file(row: dict) -> list[dict]:
    """Every sample of one file as a row; a bad sample becomes a row naming its reason."""
    out = []
    for raw in iter_samples(row["path"]):
        try:
            s = to_stored(raw)
            out.append({"key": s.key, "reason": "", "image": s.image, "caption": s.caption,
                        "label": s.label})
        except SampleError as err:
            out.append({"key": raw.key, "reason": err.reason, "image": b"", "caption": "",
                        "label": -1})
    return out


def quiet_data_context() -> None:
    """Keep batches in order and the console free of progress bars."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def load_split(source: str, *, max_samples: int | None = None) -> ImageTextDataset:
    quiet_data_context()
    files = list_shards(source)
    # Absolute paths: the read tasks may run on other nodes, in another working directory.
    ds = ray.data.from_items([{"path": str(p.resolve())} for p in files],
                             override_num_blocks=max(1, len(files)))
    rows = ds.flat_map(_read_file).take_all()
    samples, skipped = [], SkipStats()
    for r in rows:
        if r["reason"]:
            skipped.add(r["reason"])
        elif max_samples is None or len(samples) < max_samples:
            samples.append(StoredSample(r["key"], bytes(r["image"]), r["caption"], int(r["label"])))
    return ImageTextDataset(samples, skipped, find_dataset_info(source))


class _Prepare:
    """map_batches callable: (step, index) rows -> images, token ids and masks."""

    def __init__(self, samples_ref: list, image_size: int, hflip: bool, tokenizer_json: str,
                 context_length: int, seed: int):
        from tokenizers import Tokenizer
        self.samples = ray.get(samples_ref[0])
        self.transform = make_transform(image_size, train=True, hflip=hflip)
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.context_length = context_length
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, captions = [], []
        for step, index in zip(batch["step"].tolist(), batch["index"].tolist()):
            sample = self.samples[index]
            images.append(sample_tensor(sample, index, self.transform,
                                        seed=combine_seed(self.seed, step)))
            captions.append(sample.caption)
        ids, mask = encode_captions(self.tokenizer, captions, self.context_length)
        return {"step": batch["step"], "images": torch.stack(images).numpy(),
                "ids": ids.numpy(), "mask": mask.numpy()}


def worker_rows(n: int, batch_size: int, *, seed: int, start: int, end: int, rank: int,
                world: int) -> list[dict]:
    """This worker's contiguous slice of each global batch from step ``start`` to ``end``."""
    local = batch_size // world
    rows = []
    for step in range(start, end):
        idx = batch_indices(n, batch_size, seed=seed, step=step)
        rows += [{"step": step, "index": i} for i in idx[rank * local:(rank + 1) * local]]
    return rows


def worker_stream(samples_ref, n: int, cfg, tokenizer_json: str, *, start: int, end: int,
                  rank: int, world: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor,
                                                           torch.Tensor]]:
    """Yield (step, images_BCHW, ids_BL, mask_BL) for this worker, one per step, in order."""
    quiet_data_context()
    local = cfg.train.batch_size // world
    rows = worker_rows(n, cfg.train.batch_size, seed=cfg.run.seed, start=start, end=end,
                       rank=rank, world=world)
    ds = ray.data.from_items(rows).map_batches(
        _Prepare, batch_size=local, concurrency=1, num_cpus=0.5,
        fn_constructor_kwargs={"samples_ref": [samples_ref], "image_size": cfg.data.image_size,
                               "hflip": cfg.data.hflip, "tokenizer_json": tokenizer_json,
                               "context_length": cfg.tokenizer.context_length,
                               "seed": cfg.run.seed})
    for batch in ds.iter_batches(batch_size=local, batch_format="numpy", prefetch_batches=2):
        steps = batch["step"]
        if not (steps == steps[0]).all():
            raise RuntimeError(f"worker {rank}: a batch mixes steps {sorted(set(steps.tolist()))}")
        yield (int(steps[0]), torch.from_numpy(batch["images"]),
               torch.from_numpy(batch["ids"]), torch.from_numpy(batch["mask"]).bool())

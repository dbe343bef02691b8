"""The map step of the workers' Ray Data streams: row ids -> images, token ids and masks.

Light on imports on purpose (torch and the data pipeline load in the map actor itself): Ray
Data's coordinating actors unpickle this class with every dataset, on every start and every
recovery of a job, and importing torch there would cost seconds of CPU each time.
"""
from __future__ import annotations

import numpy as np


class PrepareRows:
    """map_batches callable: row ids of one worker's stream -> images, token ids and masks.

    Row r is slot r % B_local of step start + r // B_local. Any run of rows works (Ray may cut
    batches at block boundaries); each step's rows go through make_batch together.
    """

    def __init__(self, location: str, cfg, n: int, start: int, rank: int, world: int,
                 tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        from ..data import (SampleIndex, local_batch_size, make_batch, train_transform,
                            worker_indices)
        self.make_batch, self.worker_indices = make_batch, worker_indices
        self.index = SampleIndex.open(location)  # a memory map; the location carries any limit
        if len(self.index) != n:
            raise ValueError(f"sample index {location}: {len(self.index)} samples in this worker, "
                             f"{n} in the driver")
        self.n, self.start, self.rank, self.world = n, start, rank, world
        self.batch_size, self.seed = cfg.train.batch_size, cfg.run.seed
        self.local = local_batch_size(self.batch_size, world)
        self.transform = train_transform(cfg)
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.context_length = cfg.tokenizer.context_length

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = rows["id"].astype(np.int64)
        steps = self.start + ids // self.local
        slots = ids % self.local
        cuts = np.flatnonzero(np.diff(steps)) + 1
        parts = []
        for step_run, slot_run in zip(np.split(steps, cuts), np.split(slots, cuts)):
            step = int(step_run[0])
            mine = self.worker_indices(self.n, self.batch_size, seed=self.seed, step=step,
                                  rank=self.rank, world=self.world)
            parts.append(self.make_batch(self.index, [mine[j] for j in slot_run.tolist()], step=step,
                                    seed=self.seed, transform=self.transform,
                                    tokenizer=self.tokenizer, context_length=self.context_length))
        return {"step": steps,
                "images": np.concatenate([p.images_BCHW.numpy() for p in parts]),
                "ids": np.concatenate([p.ids_BL.numpy() for p in parts]),
                "mask": np.concatenate([p.mask_BL.numpy() for p in parts])}

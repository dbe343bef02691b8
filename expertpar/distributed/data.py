"""Ray Data ingestion over the sample index: no sample data passes through the driver.

1. ``build_index_on_ray`` builds (or finds cached) the source's ``SampleIndex``, scanning the
   shards in parallel Ray tasks; tasks return index rows, captions and skip counts only.
2. ``train_datasets`` makes one lazily generated Ray Dataset per Ray Train worker rank:
   ``ray.data.range`` row ids -> (step, sample index) via ``worker_indices`` -> a
   ``map_batches`` actor (prepare.py's ``PrepareRows``) that opens the index by its location (a memory map), reads each image
   by offset, and decodes, augments and tokenises through ``make_batch``, the function the
   in-process path uses; so both paths give bit-identical batches, from any start step.
3. In the worker, ``iter_worker_batches(ray.train.get_dataset_shard(dataset_name(rank)), ...)``
   yields one ``Batch`` per step, in order, and refuses a batch that mixes steps.

Hand the datasets to Ray Train unsplit: ``TorchTrainer(datasets=train_datasets(...),
dataset_config=train_data_config())``; each worker reads only its own.
"""
from __future__ import annotations

from collections import deque
from functools import partial
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import ray
import torch

from ..data import Batch, SampleIndex, local_batch_size, steps_per_epoch
from ..data.scan import ScannedFile
from .prepare import PrepareRows

_SCANS_PER_CPU = 2  # scan tasks kept in flight per cluster CPU: enough to hide stragglers


def quiet_data_context() -> None:
    """Keep batches in order and the console free of progress bars."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _ray_map(func: Callable[[str], ScannedFile], uris: Iterable[str], *,
             max_in_flight: int | None = None) -> Iterator[ScannedFile]:
    """map(func, uris) as Ray tasks, results in input order, a bounded number in flight."""
    # Never in the caller's placement group: a sweep's trial (a Tune actor, app/sweep.py)
    # reserves next to no CPU, and a scan captured into its group could never be placed.
    task = ray.remote(func).options(scheduling_strategy="DEFAULT")
    window = max_in_flight or max(1, _SCANS_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    for uri in uris:
        pending.append(task.remote(uri))
        if len(pending) >= window:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def build_index_on_ray(source: str, *, max_samples: int | None = None,
                       max_in_flight: int | None = None) -> SampleIndex:
    """The source's SampleIndex, its shards scanned in Ray tasks (which may run on any node:
    shard URIs are absolute). Only index rows and captions reach the driver.

    ``max_in_flight`` caps the scans running at once (default: two per cluster CPU). An
    embedded Ray counts more logical CPUs than the machine has cores, and every scan task that
    runs at once needs a worker process of its own (started and importing torch), so there the
    driver caps it at the core count and the few processes it starts are reused."""
    return SampleIndex.build(source, max_samples=max_samples,
                             map_fn=partial(_ray_map, max_in_flight=max_in_flight))


def dataset_name(rank: int) -> str:
    """The Ray Train dataset name of worker `rank`'s stream."""
    return f"train_rank{rank}"


def _rank_dataset(location: str, n: int, cfg, tokenizer_json: str, *, start: int, end: int,
                  rank: int, world: int) -> ray.data.Dataset:
    local = local_batch_size(cfg.train.batch_size, world)
    ds = ray.data.range((end - start) * local)  # row ids, generated lazily in blocks
    return ds.map_batches(
        PrepareRows, batch_size=local, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
        fn_constructor_kwargs={"location": location, "cfg": cfg, "n": n, "start": start,
                               "rank": rank, "world": world, "tokenizer_json": tokenizer_json})


def train_datasets(index_location: str, cfg, tokenizer_json: str, *, start: int,
                   end: int) -> dict[str, ray.data.Dataset]:
    """One lazy dataset per Ray Train worker rank (`dataset_name(rank)`), steps [start, end).

    `index_location` is `SampleIndex.location`, which carries the max_samples limit the driver
    built the index with.
    """
    if not 0 <= start <= end:
        raise ValueError(f"need 0 <= start <= end, got start={start}, end={end}")
    quiet_data_context()
    world = cfg.distributed.num_workers
    n = len(SampleIndex.open(index_location))
    steps_per_epoch(n, cfg.train.batch_size)  # fewer samples than a batch: fail here, not in a worker
    return {dataset_name(rank): _rank_dataset(index_location, n, cfg, tokenizer_json, start=start,
                                              end=end, rank=rank, world=world)
            for rank in range(world)}


def train_data_config():
    """Ray Train's DataConfig for `train_datasets`: nothing split, rows kept in order."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig
    return DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Arrays from Arrow can be read-only views; torch wants to own writable memory.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def iter_worker_batches(it, cfg, *, world: int) -> Iterator[Batch]:
    """One Batch per step, in step order, from a ray.data DataIterator of `train_datasets`."""
    local = local_batch_size(cfg.train.batch_size, world)
    expected: int | None = None
    for rows in it.iter_batches(batch_size=local, batch_format="numpy", prefetch_batches=2):
        steps = rows["step"]
        if len(steps) != local or (steps != steps[0]).any():
            raise RuntimeError(f"a data batch of {len(steps)} rows has steps "
                               f"{sorted(set(steps.tolist()))}; expected {local} rows of one step "
                               f"(rows lost their order: is preserve_order set?)")
        step = int(steps[0])
        if expected is not None and step != expected:
            raise RuntimeError(f"data batch for step {step} arrived where step {expected} was due")
        expected = step + 1
        yield Batch(step, _tensor(rows["images"]), _tensor(rows["ids"]),
                    _tensor(rows["mask"]).bool())

"""Two Ray Train workers, on data that streams, train like one process.

One run (2 workers, 2 expert actors, expert choice with a router per worker, the direct
transport) is checked two ways, since every Ray Train start costs ~30 s here:
- against the in-process reference: every step's loss, every parameter and AdamW moment;
- against the driver's traffic: the dataset is much larger than what the driver ever sees.
  The driver indexes the shards with Ray tasks and hands workers an index location; image
  bytes go from the shards to the workers' Ray Data pipelines and never through the driver.
(Token choice with 1 router and the router transport: test_dist_faults.py's run, whose first
checkpoint, 2 workers, top-2 at capacity 1.0, is checked against one process the same way.)"""
from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import ray
from PIL import Image

from conftest import tiny_config
from expertpar.app import train
from expertpar.data import RawSample, write_dataset_info, write_webdataset
from expertpar.data.catalog import DatasetInfo
from expertpar.distributed.wire import shm_dir
from expertpar.train.checkpoint import latest_checkpoint, read_shards
from expertpar.train.metrics import read_metrics

pytestmark = pytest.mark.slow

DRIVER_CAP = 256 * 1024  # bytes the driver may receive or put in all, data path included
CLASSES = ("red", "green", "blue", "grey")


def _noisy_png(rng: np.random.Generator, label: int) -> bytes:
    # Noise does not compress: each 64x64 PNG is ~12 KB, so the data is big for its count.
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels[..., label % 3] |= 0x80
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    samples = [RawSample(f"s{i:05d}", _noisy_png(rng, i % 4), "png",
                         f"a photo of {CLASSES[i % 4]} noise", {"label": i % 4})
               for i in range(640)]
    write_webdataset(samples, root / "train", shard_size=160)
    write_dataset_info(DatasetInfo("noise", CLASSES, ("a photo of {} noise",)), root)
    return root


class _DriverBytes:
    """Counts the serialised bytes of everything ``ray.get`` returns to, and ``ray.put``
    stores from, this process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.total, self.largest = 0, 0
        get, put = ray.get, ray.put

        def counted_get(refs, *args, **kwargs):
            out = get(refs, *args, **kwargs)
            self._count(out)
            return out

        def counted_put(value, *args, **kwargs):
            self._count(value)
            return put(value, *args, **kwargs)

        monkeypatch.setattr(ray, "get", counted_get)
        monkeypatch.setattr(ray, "put", counted_put)

    def _count(self, value) -> None:
        try:
            n = len(pickle.dumps(value, protocol=5))
        except Exception:  # handles and refs that do not pickle carry no sample data
            return
        self.total += n
        self.largest = max(self.largest, n)


ROUTERS = 2
STEPS = 8
# Expert choice (top_k does not apply) at capacity 1.0, in 2 routing groups: the reference
# routes the batch in the same 2 groups as the 2 routers, one per worker.
COMMON = {"data.eval": "null", "train.steps": STEPS, "train.checkpoint_every": STEPS,
          "train.log_every": 4, "model.moe.routing": "expert_choice",
          "model.moe.capacity_factor": 1.0, "model.moe.routing_groups": ROUTERS}


@pytest.fixture(scope="module")
def two_workers(ray_local, big_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_workers")
    cfg = tiny_config(big_data, tmp / "ray", **COMMON, **{
        "distributed.backend": "ray", "distributed.num_workers": 2, "experts.num_actors": 2,
        "experts.cpus_per_actor": 0.5, "experts.num_routers": ROUTERS,
        "experts.transport": "direct"})
    # The Ray run first: it indexes the shards (Ray tasks whose rows reach the driver, and are
    # counted); the in-process run after it finds that index cached.
    assert not list(big_data.rglob(".expertpar-index"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = _DriverBytes(monkeypatch)
        result = train(cfg)
    reference = train(tiny_config(big_data, tmp / "local", **COMMON))
    return {"reference": reference, "result": result, "driver": seen}


def _tensors(run_dir):
    return read_shards(latest_checkpoint(run_dir / "checkpoints"))


def test_two_workers_train_like_one_process_and_leave_no_shared_buffers(two_workers):
    ref, got = two_workers["reference"], two_workers["result"]
    start = [m for m in read_metrics(got.run_dir / "metrics.jsonl") if m.get("event") == "start"]
    assert [m["train/workers"] for m in start] == [2]  # two Ray Train workers ran the loop
    topology = json.loads((got.run_dir / "ray_topology.json").read_text())
    assert [r["group"] for r in topology["routers"]] == list(range(ROUTERS))
    assert len(got.losses) == STEPS and got.losses == pytest.approx(ref.losses, rel=1e-5)
    a, b = _tensors(ref.run_dir), _tensors(got.run_dir)
    assert sorted(a) == sorted(b)
    # Every parameter and AdamW moment at the design's 1e-5, relative per tensor
    # (||got - want|| / ||want||).
    errors = {}
    for file in a:
        assert sorted(a[file]) == sorted(b[file]), file
        for key in a[file]:
            want, got_ = a[file][key].double(), b[file][key].double()
            errors[(file, key)] = float((got_ - want).norm() / want.norm().clamp_min(1e-30))
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert max(errors.values()) <= 1e-5, worst
    # Every buffer was mapped by its receiver, which removed its name: nothing is left.
    assert not [n for n in os.listdir(shm_dir()) if n.startswith("expertpar-wire")]


def test_ray_path_trains_from_data_twenty_times_what_reaches_the_driver(two_workers, big_data):
    data_bytes = sum(p.stat().st_size for p in (big_data / "train").glob("*.tar"))
    assert data_bytes >= 20 * DRIVER_CAP, data_bytes
    result, seen = two_workers["result"], two_workers["driver"]
    assert result.steps_done == STEPS and np.isfinite(result.losses).all()
    start = [m for m in read_metrics(result.run_dir / "metrics.jsonl") if m.get("event")]
    assert start[0]["data/train_samples"] == 640 and start[0]["train/workers"] == 2
    # 8 steps x 32 samples: 256 samples trained on, ~3 MB of images; the driver saw index
    # rows, captions, actor handles and metrics only.
    print(f"data {data_bytes} B; the driver received or put {seen.total} B in all, the largest "
          f"object {seen.largest} B")  # shown with -s; the README quotes it
    assert seen.total < DRIVER_CAP, (seen.total, seen.largest)

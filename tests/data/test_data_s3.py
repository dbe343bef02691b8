"""End to end against a real S3-compatible server (moto's, on 127.0.0.1, started here).

The endpoint and credentials come from the standard AWS environment variables, as on a
cluster; the index is built from s3:// URIs, cached in the bucket next to the shards, and its
batches equal those of the same shards read from local disk.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from shard_helpers import CountingMap, write_manifest_dir, write_messy_shard

from expertpar.data import SampleIndex, iter_samples, make_transform, write_synthetic
from expertpar.data import storage
from expertpar.data.index import INDEX_DIR

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
boto3 = pytest.importorskip("boto3")

BUCKET = "corpus"


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh bucket; AWS_* variables point at the test server, nothing outside tmp_path."""
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
                        "HOME": str(tmp_path / "home"),
                        "EXPERTPAR_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def _upload(client, local_dir: Path, prefix: str) -> None:
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and INDEX_DIR not in path.parts:
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local_dir).as_posix()}")




def test_s3_index_and_batches_equal_local(s3, tmp_path: Path) -> None:
    local = write_synthetic(tmp_path / "syn", n_train=30, n_test=4, seed=2, shard_size=12)
    write_messy_shard(local / "train" / "shard-00009.tar")
    _upload(s3, local, "syn")
    source = f"s3://{BUCKET}/syn/train"
    assert storage.list_shards(source) == [f"{source}/shard-{i:05d}.tar" for i in (0, 1, 2, 9)]
    assert storage.list_shards(f"s3://{BUCKET}/syn/*/shard-0000[01].tar") == [
        f"s3://{BUCKET}/syn/test/shard-00000.tar", f"{source}/shard-00000.tar", f"{source}/shard-00001.tar"]

    counting = CountingMap()
    remote = SampleIndex.build(source, map_fn=counting)
    want = SampleIndex.build(str(local / "train"))
    assert remote.location.startswith(f"{source}/{INDEX_DIR}/")  # cached in the bucket
    assert len(remote) == len(want) == 36 and remote.skipped.counts == want.skipped.counts
    assert list(remote.captions) == list(want.captions) and torch.equal(remote.labels, want.labels)
    assert remote.info == want.info and remote.info.name == "synthetic-shapes"  # dataset.json in the bucket
    tf = make_transform(24, train=True)
    idx = [0, 13, 35, 29, 7]
    got, want_batch = remote.batch(idx, tf, seed=3), want.batch(idx, tf, seed=3)
    assert torch.equal(got[0], want_batch[0]) and got[1] == want_batch[1]
    assert remote.sample(33) == want.sample(33)
    assert list(iter_samples(f"{source}/shard-00009.tar")) == list(iter_samples(local / "train" / "shard-00009.tar"))

    # Cached: a second build reads no shard; opening by location maps a local copy.
    again = SampleIndex.build(source, map_fn=counting)
    assert len(counting.files) == 4 and again.location == remote.location
    opened = SampleIndex.open(remote.location)
    assert Path(opened._records.filename).is_relative_to(tmp_path / "cache")
    assert torch.equal(opened.batch(idx, tf, seed=3)[0], want_batch[0])

    # A changed shard in the bucket means a new index, even at the same size within the same
    # second (S3 mtimes have one-second resolution; the ETag tells the versions apart).
    data = bytearray((local / "train" / "shard-00001.tar").read_bytes())
    data[remote.locate(12).offset + 40] ^= 0xFF  # inside the first image of shard 1
    s3.put_object(Bucket=BUCKET, Key="syn/train/shard-00001.tar", Body=bytes(data))
    changed = SampleIndex.build(source, map_fn=counting)
    assert changed.location != remote.location and len(counting.files) == 8
    assert changed.skipped.counts["corrupt_image"] == want.skipped.counts["corrupt_image"] + 1


def test_s3_manifest_and_sequential_reading(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The S3-specific variable works as well as the general one.
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    local = write_manifest_dir(tmp_path / "m").parent
    _upload(s3, local, "m")
    source = f"s3://{BUCKET}/m/list.csv"
    remote = SampleIndex.build(source)
    want = SampleIndex.build(str(local / "list.csv"))
    assert list(remote.keys) == list(want.keys) and remote.skipped.counts == want.skipped.counts
    assert remote.locate(0).uri == f"s3://{BUCKET}/m/img/0.png"
    assert [remote.sample(i).image for i in range(len(remote))] == [
        want.sample(i).image for i in range(len(want))]
    assert [s.image for s in iter_samples(source)] == [s.image for s in iter_samples(local / "list.csv")]


def test_s3_errors_name_the_uri(s3) -> None:
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/nothing-here"):
        SampleIndex.build(f"s3://{BUCKET}/nothing-here")
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/none.tar"):
        storage.read_range(f"s3://{BUCKET}/none.tar", 0, 4)
    with pytest.raises(FileNotFoundError, match="no complete sample index"):
        SampleIndex.open(f"s3://{BUCKET}/nothing-here/{INDEX_DIR}/abc")

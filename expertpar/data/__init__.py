"""Data: where data lives (storage), sample formats, the sample index, batches, tokenisation.

A dataset is a `SampleIndex` (built once per shard set, cached next to the shards, opened as
a memory map); `make_batch` is the one place a training batch is built. Nothing here imports
Ray: the per-sample functions are pure so the Ray Data pipeline (expertpar.distributed.data)
reuses them.
"""
from .batch import Batch, local_batch_size, make_batch, train_batches, train_transform, worker_indices
from .catalog import (
    DatasetInfo,
    find_dataset_info,
    locate_dataset_info,
    read_dataset_info,
    write_dataset_info,
)
from .dataset import (
    ImageTextDataset,
    SkipStats,
    StoredSample,
    batch_indices,
    combine_seed,
    epoch_order,
    steps_per_epoch,
    validate_sample,
)
from .errors import SKIP_REASONS, SampleError
from .fashion_mnist import convert_fashion_mnist, read_idx
from .formats import (
    RawSample,
    iter_manifest,
    iter_samples,
    iter_webdataset,
    list_shards,
    write_manifest,
    write_webdataset,
)
from .index import SampleIndex, SampleLocation, StringTable
from .images import apply_transform, decode_image, make_transform
from .storage import (
    FileStat,
    is_remote,
    list_shard_stats,
    open_input,
    read_bytes,
    read_range,
)
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import make_sample, write_synthetic
from .tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    encode_captions,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    vocab_size,
)

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "SKIP_REASONS", "SYNTHETIC_CLASSES", "UNK_ID",
    "Batch", "DatasetInfo", "FileStat", "ImageTextDataset", "RawSample", "SampleError",
    "SampleIndex", "SampleLocation", "SkipStats", "StoredSample", "StringTable",
    "apply_transform", "batch_indices", "combine_seed", "convert_fashion_mnist", "decode_image",
    "encode_captions", "epoch_order", "find_dataset_info", "is_remote", "iter_manifest",
    "iter_samples", "iter_webdataset", "list_shard_stats", "list_shards", "load_tokenizer",
    "local_batch_size", "locate_dataset_info", "make_batch", "make_sample", "make_transform",
    "open_input", "read_bytes", "read_dataset_info", "read_idx", "read_range", "save_tokenizer",
    "steps_per_epoch", "train_batches", "train_tokenizer", "train_transform", "validate_sample",
    "vocab_size", "worker_indices", "write_dataset_info", "write_manifest", "write_synthetic",
    "write_webdataset",
]

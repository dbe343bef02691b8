"""Data: where data lives (storage), sample formats, the sample index, batches, tokenisation.

A dataset is a `SampleIndex` (built once per shard set, cached next to the shards, opened as
a memory map); `make_batch` is the one place a training batch is built. Nothing here imports
Ray: the per-sample functions are pure so the Ray Data pipeline (expertpar.distributed.data)
reuses them.

Names are imported on first use (PEP 562), so a process that needs one module — a Ray task
that scans shards needs Pillow and pyarrow, not torch — does not pay for the others.
"""
from __future__ import annotations

import importlib

_EXPORTS = {  # public name -> (module, name in it)
    "Batch": ("batch", "Batch"),
    "local_batch_size": ("batch", "local_batch_size"),
    "make_batch": ("batch", "make_batch"),
    "train_batches": ("batch", "train_batches"),
    "train_transform": ("batch", "train_transform"),
    "worker_indices": ("batch", "worker_indices"),
    "DatasetInfo": ("catalog", "DatasetInfo"),
    "find_dataset_info": ("catalog", "find_dataset_info"),
    "locate_dataset_info": ("catalog", "locate_dataset_info"),
    "read_dataset_info": ("catalog", "read_dataset_info"),
    "write_dataset_info": ("catalog", "write_dataset_info"),
    "ImageTextDataset": ("dataset", "ImageTextDataset"),
    "SkipStats": ("dataset", "SkipStats"),
    "StoredSample": ("dataset", "StoredSample"),
    "batch_indices": ("dataset", "batch_indices"),
    "combine_seed": ("dataset", "combine_seed"),
    "epoch_order": ("dataset", "epoch_order"),
    "steps_per_epoch": ("dataset", "steps_per_epoch"),
    "validate_sample": ("dataset", "validate_sample"),
    "SKIP_REASONS": ("errors", "SKIP_REASONS"),
    "SampleError": ("errors", "SampleError"),
    "convert_fashion_mnist": ("fashion_mnist", "convert_fashion_mnist"),
    "read_idx": ("fashion_mnist", "read_idx"),
    "RawSample": ("formats", "RawSample"),
    "iter_manifest": ("formats", "iter_manifest"),
    "iter_samples": ("formats", "iter_samples"),
    "iter_webdataset": ("formats", "iter_webdataset"),
    "list_shards": ("formats", "list_shards"),
    "write_manifest": ("formats", "write_manifest"),
    "write_webdataset": ("formats", "write_webdataset"),
    "apply_transform": ("images", "apply_transform"),
    "decode_image": ("images", "decode_image"),
    "make_transform": ("images", "make_transform"),
    "SampleIndex": ("index", "SampleIndex"),
    "SampleLocation": ("index", "SampleLocation"),
    "StringTable": ("index", "StringTable"),
    "FileStat": ("storage", "FileStat"),
    "is_remote": ("storage", "is_remote"),
    "list_shard_stats": ("storage", "list_shard_stats"),
    "open_input": ("storage", "open_input"),
    "read_bytes": ("storage", "read_bytes"),
    "read_range": ("storage", "read_range"),
    "SYNTHETIC_CLASSES": ("synthetic", "CLASSES"),
    "make_sample": ("synthetic", "make_sample"),
    "write_synthetic": ("synthetic", "write_synthetic"),
    "BOS_ID": ("tokenizer", "BOS_ID"),
    "EOS_ID": ("tokenizer", "EOS_ID"),
    "PAD_ID": ("tokenizer", "PAD_ID"),
    "UNK_ID": ("tokenizer", "UNK_ID"),
    "encode_captions": ("tokenizer", "encode_captions"),
    "load_tokenizer": ("tokenizer", "load_tokenizer"),
    "save_tokenizer": ("tokenizer", "save_tokenizer"),
    "train_tokenizer": ("tokenizer", "train_tokenizer"),
    "vocab_size": ("tokenizer", "vocab_size"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # the next lookup is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

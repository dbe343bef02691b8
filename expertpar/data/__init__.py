"""Data: sample formats, image decoding/transforms, tokenisation, datasets.

Nothing here imports Ray: the per-sample functions are pure so a Ray Data pipeline
can reuse them.
"""
from expertpar.data.catalog import (
    DatasetInfo,
    find_dataset_info,
    locate_dataset_info,
    read_dataset_info,
    write_dataset_info,
)
from expertpar.data.dataset import (
    ImageTextDataset,
    SkipStats,
    StoredSample,
    batch_indices,
    combine_seed,
    epoch_order,
    steps_per_epoch,
    validate_sample,
)
from expertpar.data.errors import SKIP_REASONS, SampleError
from expertpar.data.fashion_mnist import convert_fashion_mnist, read_idx
from expertpar.data.formats import (
    RawSample,
    iter_manifest,
    iter_samples,
    iter_webdataset,
    list_shards,
    write_manifest,
    write_webdataset,
)
from expertpar.data.images import apply_transform, decode_image, make_transform
from expertpar.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from expertpar.data.synthetic import make_sample, write_synthetic
from expertpar.data.tokenizer import (
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
    "DatasetInfo", "ImageTextDataset", "RawSample", "SampleError", "SkipStats", "StoredSample",
    "apply_transform", "batch_indices", "combine_seed", "convert_fashion_mnist", "decode_image",
    "encode_captions", "epoch_order", "find_dataset_info", "iter_manifest", "iter_samples",
    "iter_webdataset", "list_shards", "load_tokenizer", "locate_dataset_info", "make_sample",
    "make_transform", "read_dataset_info", "read_idx", "save_tokenizer", "steps_per_epoch",
    "train_tokenizer", "validate_sample", "vocab_size", "write_dataset_info", "write_manifest",
    "write_synthetic", "write_webdataset",
]

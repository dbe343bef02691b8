"""Embed a held-out split: image and caption embeddings, labels, routing statistics."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import SampleIndex, encode_captions
from ..moe import RoutingStats


@dataclass
class Embedded:
    image_NE: torch.Tensor
    text_NE: torch.Tensor
    labels_N: torch.Tensor
    captions: list[str]
    stats: dict[int, RoutingStats] = field(default_factory=dict)


@torch.no_grad()
def embed_dataset(model, ds: SampleIndex, tokenizer, transform, *, context_length: int,
                  batch_size: int, device: torch.device) -> Embedded:
    was_training = model.training
    model.eval()
    images, texts, labels, stats = [], [], [], {}
    try:
        for start in range(0, len(ds), batch_size):
            idx = list(range(start, min(start + batch_size, len(ds))))
            imgs, captions, labs = ds.batch(idx, transform, seed=None)
            ids, mask = encode_captions(tokenizer, captions, context_length)
            enc = model.encode(imgs.to(device), ids.to(device), mask.to(device))
            images.append(enc.image_BE.float().cpu())
            texts.append(enc.text_BE.float().cpu())
            labels.append(labs)
            for L, s in enc.stats.items():
                stats[L] = stats[L] + s if L in stats else s
    finally:
        model.train(was_training)
    return Embedded(torch.cat(images), torch.cat(texts), torch.cat(labels), list(ds.captions), stats)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], *, context_length: int, batch_size: int,
                device: torch.device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_captions(tokenizer, texts[start:start + batch_size], context_length)
            out.append(model.encode(None, ids.to(device), mask.to(device)).text_BE.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)

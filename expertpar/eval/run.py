"""One evaluation pass over a held-out split, as a flat dict of metrics."""
from __future__ import annotations

from functools import partial

import torch

from ..config import Config
from ..data import DatasetInfo, SampleIndex, make_transform
from .captions import caption_scores
from .embed import embed_dataset, embed_texts
from .generate import caption_split
from .retrieval import recall_at_k
from .zeroshot import class_embeddings, zero_shot_accuracy


def evaluate(model, ds: SampleIndex, tokenizer, cfg: Config, *,
             info: DatasetInfo | None, device: torch.device) -> dict[str, float]:
    out: dict[str, float] = {"eval/samples": len(ds)}
    # A captioning-only model's text tower and projections never trained: no contrastive
    # metrics for it.
    if cfg.model.has_contrastive:
        emb = embed_split(model, ds, tokenizer, cfg, device)
        out.update(recall_at_k(emb.image_NE, emb.text_NE, emb.captions, cfg.eval.recall_at))
        if info is not None and info.classes:
            class_CE = embed_classes(model, tokenizer, cfg, info, device)
            out.update(zero_shot_accuracy(emb.image_NE, emb.labels_N, class_CE,
                                          cfg.eval.zero_shot_top))
        for L, stats in sorted(emb.stats.items()):
            out.update(stats.summary(f"eval/moe{L}"))
    if cfg.model.has_decoder:
        # Greedy captions of every held-out image, against its caption (one reference each).
        generated = caption_split(model, ds, tokenizer, image_size=cfg.data.image_size,
                                  max_tokens=cfg.tokenizer.context_length - 1,
                                  batch_size=cfg.eval.batch_size, device=device)
        out.update(caption_scores(generated, [[c] for c in ds.captions]))
    return out


def embed_split(model, ds: SampleIndex, tokenizer, cfg: Config, device: torch.device):
    """Every image and caption of ``ds``, embedded as evaluation sees them."""
    return embed_dataset(model, ds, tokenizer, make_transform(cfg.data.image_size, train=False),
                         context_length=cfg.tokenizer.context_length,
                         batch_size=cfg.eval.batch_size, device=device)


def embed_classes(model, tokenizer, cfg: Config, info: DatasetInfo,
                  device: torch.device) -> torch.Tensor:
    """One embedding per class of ``info``: its prompts (templates) embedded and averaged."""
    embed = partial(embed_texts, model, tokenizer, context_length=cfg.tokenizer.context_length,
                    batch_size=cfg.eval.batch_size, device=device)
    return class_embeddings(embed, info.classes, info.templates or ("{}",))

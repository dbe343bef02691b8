"""Zero-shot classification: class-name prompts embedded by the text tower, nearest class wins."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_embeddings(embed_texts, classes: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
    """Mean of the normalised embeddings of every template filled with each class (CLIP)."""
    prompts = [t.format(c) for c in classes for t in templates]
    emb = embed_texts(prompts).reshape(len(classes), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def zero_shot_accuracy(image_NE: torch.Tensor, labels_N: torch.Tensor, class_CE: torch.Tensor,
                       ks: tuple[int, ...]) -> dict[str, float]:
    known = labels_N >= 0
    if not known.any():
        return {}
    scores_NC = image_NE[known] @ class_CE.t()
    labels = labels_N[known]
    out = {}
    for k in ks:
        k_eff = min(k, class_CE.shape[0])
        top = scores_NC.topk(k_eff, dim=1).indices
        out[f"zero_shot/top{k}"] = float((top == labels[:, None]).any(dim=1).float().mean())
    out["zero_shot/chance_top1"] = 1.0 / class_CE.shape[0]
    out["zero_shot/samples"] = int(known.sum())
    return out


def confusion_matrix(image_NE: torch.Tensor, labels_N: torch.Tensor,
                     class_CE: torch.Tensor) -> torch.Tensor:
    """Counts_CC: row = true class, column = the class zero-shot top-1 picked; images without a
    label (-1) are left out, so the trace over the sum is ``zero_shot/top1``."""
    known = labels_N >= 0
    C = class_CE.shape[0]
    picked = (image_NE[known] @ class_CE.t()).argmax(dim=1)
    flat = labels_N[known] * C + picked
    return torch.bincount(flat, minlength=C * C).reshape(C, C)

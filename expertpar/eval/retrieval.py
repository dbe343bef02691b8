"""Image->text and text->image retrieval recall@K on a held-out split.

A retrieved item counts as correct when its caption is the query's own caption text: synthetic
and class-derived captions repeat, and identical captions have identical embeddings, so ranking
one above the other would be a coin toss, not a model error.
"""
from __future__ import annotations

import torch


def _caption_ids(captions: list[str]) -> torch.Tensor:
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions])


def recall_at_k(image_NE: torch.Tensor, text_NE: torch.Tensor, captions: list[str],
                ks: tuple[int, ...]) -> dict[str, float]:
    cap_N = _caption_ids(captions)
    sim_NN = image_NE @ text_NE.t()  # rows: images, columns: captions
    out = {}
    for name, sim in (("image_to_text", sim_NN), ("text_to_image", sim_NN.t())):
        for k in ks:
            top = sim.topk(min(k, sim.shape[1]), dim=1).indices
            hit = (cap_N[top] == cap_N[:, None]).any(dim=1)
            out[f"retrieval/{name}/R@{k}"] = float(hit.float().mean())
    out["retrieval/unique_captions"] = int(cap_N.max()) + 1 if len(captions) else 0
    return out


def top_captions(image_NE: torch.Tensor, text_NE: torch.Tensor, captions: list[str],
                 queries: list[int], k: int) -> list[list[tuple[str, float]]]:
    """For each image index in ``queries``, its ``k`` nearest captions with their similarity,
    best first. Repeated caption texts are ranked once: they share one embedding, so listing
    each copy would fill the top-k with one caption."""
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    unique = list(first.values())  # the first sample of each caption text, in sample order
    sim_QU = image_NE[queries] @ text_NE[unique].t()
    scores, top = sim_QU.topk(min(k, len(unique)), dim=1)
    return [[(captions[unique[j]], float(s)) for j, s in zip(row.tolist(), srow.tolist())]
            for row, srow in zip(top, scores)]

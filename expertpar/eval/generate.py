"""Captions from images: greedy and beam-search decoding with the caption decoder, and a
caption for every image of a split.

No key/value cache: captions are a context length (16 tokens) long, so each step runs the
decoder over the prefix again; that keeps one decoder forward, the one training uses, and
lets its MoE layers run on either backend unchanged.

Shapes: B images, K hypotheses each, R = B x K hypothesis rows (image b's are b*K..b*K+K-1),
L tokens so far, V vocabulary, N image tokens, D model width.
"""
from __future__ import annotations

import torch

from ..data import SampleIndex, make_transform
from ..data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from ..moe import RouteContext


@torch.no_grad()
def generate(model, images_BCHW: torch.Tensor, *, max_tokens: int,
             beam: int = 1) -> list[list[int]]:
    """Token ids of one caption per image ([BOS], [EOS] and padding left out): at most
    ``max_tokens`` generated tokens ([EOS] counted), the best of ``beam`` hypotheses (1:
    greedy)."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    was_training = model.training
    model.eval()
    try:
        memory_BND = model.encode(images_BCHW).image_tokens_BND
        search = _greedy if beam == 1 else _beam_search
        ids_BL = search(model, memory_BND, max_tokens, beam)
    finally:
        model.train(was_training)
    return [_strip(row) for row in ids_BL.tolist()]


def _next_log_probs(model, memory_BND: torch.Tensor, ids_BL: torch.Tensor) -> torch.Tensor:
    """log p(next token) after each row's prefix; [PAD] and [BOS] are never generated."""
    # Padding (after a finished caption) is masked: it takes no MoE capacity from live rows.
    logits_BV = model.decode(memory_BND, ids_BL, ids_BL != PAD_ID, RouteContext())[:, -1]
    logits_BV = logits_BV.float()
    logits_BV[:, [PAD_ID, BOS_ID]] = float("-inf")
    return torch.log_softmax(logits_BV, dim=-1)


def _greedy(model, memory_BND: torch.Tensor, max_tokens: int, _beam: int) -> torch.Tensor:
    B = memory_BND.shape[0]
    ids_BL = torch.full((B, 1), BOS_ID, dtype=torch.long, device=memory_BND.device)
    done_B = torch.zeros(B, dtype=torch.bool, device=memory_BND.device)
    for _ in range(max_tokens):
        next_B = _next_log_probs(model, memory_BND, ids_BL).argmax(-1)
        next_B = torch.where(done_B, PAD_ID, next_B)
        ids_BL = torch.cat([ids_BL, next_B[:, None]], dim=1)
        done_B |= next_B == EOS_ID
        if done_B.all():
            break
    return ids_BL


def _beam_search(model, memory_BND: torch.Tensor, max_tokens: int, K: int) -> torch.Tensor:
    """K hypotheses per image, extended by the K best (hypothesis, token) pairs by summed
    log-probability; finished ones carry on unchanged. The result is each image's hypothesis
    of best mean log-probability per token ([EOS] counted), so short captions are not favoured
    for being short."""
    B, device = memory_BND.shape[0], memory_BND.device
    memory_RND = memory_BND.repeat_interleave(K, dim=0)  # rows b*K .. b*K+K-1 are image b's
    ids_RL = torch.full((B * K, 1), BOS_ID, dtype=torch.long, device=device)
    score_BK = torch.full((B, K), float("-inf"), device=device)
    score_BK[:, 0] = 0.0  # one live hypothesis at first: K copies would fill the beam with one
    done_R = torch.zeros(B * K, dtype=torch.bool, device=device)
    length_R = torch.zeros(B * K, device=device)
    for _ in range(max_tokens):
        logp_RV = _next_log_probs(model, memory_RND, ids_RL)
        V = logp_RV.shape[1]
        # A finished hypothesis has one continuation, padding, at no cost.
        logp_RV[done_R] = float("-inf")
        logp_RV[done_R, PAD_ID] = 0.0
        total_BKV = (score_BK.reshape(-1, 1) + logp_RV).reshape(B, K * V)
        score_BK, pick_BK = total_BKV.topk(K, dim=-1)
        parent_R = (torch.arange(B, device=device)[:, None] * K + pick_BK // V).reshape(-1)
        token_R = (pick_BK % V).reshape(-1)
        ids_RL = torch.cat([ids_RL[parent_R], token_R[:, None]], dim=1)
        length_R = length_R[parent_R] + (~done_R[parent_R]).float()
        done_R = done_R[parent_R] | (token_R == EOS_ID)
        if done_R.all():
            break
    best_B = (score_BK / length_R.reshape(B, K).clamp_min(1)).argmax(-1)
    return ids_RL[torch.arange(B, device=device) * K + best_B]


def _strip(row: list[int]) -> list[int]:
    """The caption's tokens: after [BOS], up to [EOS] or padding."""
    out = []
    for token in row[1:]:
        if token in (EOS_ID, PAD_ID):
            break
        out.append(token)
    return out


@torch.no_grad()
def caption_split(model, ds: SampleIndex, tokenizer, *, image_size: int, max_tokens: int,
                  batch_size: int, device: torch.device, beam: int = 1) -> list[str]:
    """A generated caption for every image of ``ds``, in its order."""
    transform = make_transform(image_size, train=False)
    out = []
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(start + batch_size, len(ds))))
        images, _, _ = ds.batch(idx, transform, seed=None)
        ids = generate(model, images.to(device), max_tokens=max_tokens, beam=beam)
        out.extend(tokenizer.decode_batch(ids, skip_special_tokens=True))
    return out

"""Routing: gate logits -> temperature softmax -> top-k -> capacity.

Shape legend: T tokens, D model dim, E experts, K experts chosen per token.

``route`` is a pure function of its inputs (the noise comes from an explicit seed), so the
in-process layer and a router living in another process compute bit-identical routing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import MoEConfig

IMAGE, TEXT = 0, 1  # modality ids carried per token
MODALITIES = {IMAGE: "image", TEXT: "text"}


@dataclass(frozen=True)
class Routing:
    logits_TE: torch.Tensor  # fp32, temperature-scaled, noise included when training
    probs_TE: torch.Tensor  # fp32 softmax(alpha * logits)
    expert_TK: torch.Tensor  # int64 chosen experts, best first
    weight_TK: torch.Tensor  # fp32 combine weights; zero where the assignment was dropped
    keep_TK: torch.Tensor  # bool, the assignment survived the capacity limit
    capacity: Optional[int]  # tokens per expert, None when dropless


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert: ceil(factor * T * K / E), at least 1 when there are tokens."""
    if num_tokens < 0 or num_experts < 1 or top_k < 1 or not factor > 0:
        raise ValueError(f"expert_capacity: need T >= 0, E >= 1, K >= 1, factor > 0; got "
                         f"T={num_tokens}, E={num_experts}, K={top_k}, factor={factor}")
    if num_tokens == 0:
        return 0
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def gate_logits(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    # fp32 whatever the activations' dtype: the softmax over experts is sensitive to rounding.
    return F.linear(x_TD.float(), w_ED.float())


def gate_noise(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Standard normal noise as a pure function of ``seed`` (same in every process)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen)


def assignment_priority(probs_TE: torch.Tensor, expert_TK: torch.Tensor,
                        modality_T: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Higher keeps first. Scores lie in (0, 1]; text gets +1 under batch-prioritised images."""
    T, K = expert_TK.shape
    if cfg.drop_policy == "probability":
        score_TK = probs_TE.gather(1, expert_TK)
    else:  # "position": earlier tokens first, as in the Switch Transformer
        pos_T = 1.0 - torch.arange(T, dtype=torch.float32, device=probs_TE.device) / max(T, 1)
        score_TK = pos_T[:, None].expand(T, K).clone()
    if cfg.batch_prioritized_images:
        # V-MoE BPR for image tokens: rank image patches by their top-1 gate probability,
        # and let (few, information-dense) text tokens go first.
        is_image_T = modality_T == IMAGE
        top1_T = probs_TE.max(dim=1).values
        score_TK = torch.where(is_image_T[:, None], top1_T[:, None].expand(T, K), score_TK + 1.0)
    return score_TK


def capacity_keep(expert_TK: torch.Tensor, score_TK: torch.Tensor, num_experts: int,
                  capacity: int) -> torch.Tensor:
    """Which assignments fit: all first choices before any second choice, then by score."""
    T, K = expert_TK.shape
    # k-major flattening so that choice rank dominates; a stable sort on -score within it.
    e_A = expert_TK.t().reshape(-1)
    score_A = score_TK.t().reshape(-1)
    rank_A = torch.arange(K, device=expert_TK.device).repeat_interleave(T)
    order = torch.argsort(-score_A, stable=True)
    order = order[torch.argsort(rank_A[order], stable=True)]
    onehot_AE = F.one_hot(e_A[order], num_experts)
    slot_A = (onehot_AE.cumsum(0) * onehot_AE).sum(1) - 1  # position within its expert
    keep_A = torch.empty(T * K, dtype=torch.bool, device=expert_TK.device)
    keep_A[order] = slot_A < capacity
    return keep_A.reshape(K, T).t()


def route(x_TD: torch.Tensor, w_ED: torch.Tensor, modality_T: torch.Tensor, cfg: MoEConfig,
          *, training: bool, noise_seed: Optional[int] = None) -> Routing:
    T = x_TD.shape[0]
    E, K = cfg.num_experts, cfg.top_k
    logits_TE = gate_logits(x_TD, w_ED)
    if training and cfg.noise_std > 0:
        if noise_seed is None:
            raise ValueError("noisy gating needs a noise_seed (step and layer derived)")
        logits_TE = logits_TE + cfg.noise_std * gate_noise((T, E), noise_seed).to(logits_TE.device)
    logits_TE = cfg.temperature * logits_TE
    probs_TE = torch.softmax(logits_TE, dim=-1)
    top_p_TK, expert_TK = probs_TE.topk(K, dim=-1)
    if K > 1 and cfg.renormalize:
        top_p_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
    factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    if cfg.dropless:
        capacity = None
        keep_TK = torch.ones_like(expert_TK, dtype=torch.bool)
    else:
        capacity = expert_capacity(T, E, K, factor)
        score_TK = assignment_priority(probs_TE.detach(), expert_TK, modality_T, cfg)
        keep_TK = capacity_keep(expert_TK, score_TK, E, capacity)
    weight_TK = top_p_TK * keep_TK
    return Routing(logits_TE, probs_TE, expert_TK, weight_TK, keep_TK, capacity)

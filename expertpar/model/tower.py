"""Transformer blocks over several sequences at once, with dense or sparse-MoE FFNs.

A tower takes a list of sequences (the image batch and/or the text batch). Attention runs per
sequence; the FFN (or MoE) runs on the valid tokens of *all* sequences together, so one MoE call
per layer sees both modalities, which is what LIMoE's per-modality losses and statistics need,
and padding tokens never take expert capacity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..moe import MoEOutput, RouteContext


@dataclass
class Seq:
    x_BND: torch.Tensor
    mask_BN: torch.Tensor  # bool, True for real tokens
    modality: int


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        # No bias: a key bias provably gets zero gradient (softmax ignores a constant shift),
        # so Adam would only amplify rounding noise in it.
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x_BND: torch.Tensor, mask_BN: torch.Tensor,
                causal: bool = False) -> torch.Tensor:
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).reshape(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each B,H,N,Dh
        mask_B11N = mask_BN[:, None, None, :]
        # Causal: position n sees keys 0..n only. Position 0 ([BOS]) is always a real token,
        # so no row is left with every key masked.
        attn_mask = (mask_B11N & torch.ones(N, N, dtype=torch.bool, device=x_BND.device).tril()
                     if causal else mask_B11N)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Caption tokens (queries) attend to every image token (keys and values)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)  # no key bias, as in Attention
        self.out = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor, image_BND: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        N, H = image_BND.shape[1], self.heads
        q = self.q(x_BLD).reshape(B, L, H, D // H).transpose(1, 2)  # B,H,L,Dh
        k, v = self.kv(image_BND).reshape(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: nn.Module, is_moe: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.is_moe = is_moe

    def forward(self, seqs: list[Seq], ctx: RouteContext) -> tuple[list[Seq], MoEOutput | None]:
        seqs = [Seq(s.x_BND + self.attn(self.norm1(s.x_BND), s.mask_BN), s.mask_BN, s.modality)
                for s in seqs]
        return self._ffn(seqs, ctx)

    def _ffn(self, seqs: list[Seq], ctx: RouteContext) -> tuple[list[Seq], MoEOutput | None]:
        # Gather the valid tokens of every sequence into one T x D matrix.
        x_TD = torch.cat([s.x_BND[s.mask_BN] for s in seqs])
        modality_T = torch.cat([torch.full((int(s.mask_BN.sum()),), s.modality,
                                           dtype=torch.long, device=x_TD.device) for s in seqs])
        h_TD = self.norm2(x_TD)
        moe_out = None
        if self.is_moe:
            groups = getattr(self.ffn, "routing_groups", 1)
            group_T = _group_of_token(seqs, groups) if groups > 1 else None
            moe_out = self.ffn(h_TD, modality_T, ctx, group_T)
        y_TD = moe_out.y_TD if moe_out is not None else self.ffn(h_TD)
        out, start = [], 0
        for s in seqs:
            n = int(s.mask_BN.sum())
            delta_BND = torch.zeros_like(s.x_BND)
            delta_BND[s.mask_BN] = y_TD[start:start + n].to(s.x_BND.dtype)
            out.append(Seq(s.x_BND + delta_BND, s.mask_BN, s.modality))
            start += n
        return out, moe_out


class DecoderBlock(Block):
    """A caption decoder block (CoCa's multimodal decoder): causal self-attention over the
    caption so far, cross-attention to the image tokens, then the FFN or MoE over the valid
    tokens exactly as an encoder block's."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module, is_moe: bool):
        super().__init__(dim, heads, ffn, is_moe)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)

    def forward(self, seqs: list[Seq], ctx: RouteContext,
                image_BND: torch.Tensor) -> tuple[list[Seq], MoEOutput | None]:
        (s,) = seqs
        x_BLD = s.x_BND + self.attn(self.norm1(s.x_BND), s.mask_BN, causal=True)
        x_BLD = x_BLD + self.cross(self.norm_cross(x_BLD), image_BND)
        return self._ffn([Seq(x_BLD, s.mask_BN, s.modality)], ctx)


def _group_of_token(seqs: list[Seq], groups: int) -> torch.Tensor:
    """Each gathered token's routing group: sample b of B is in group b * groups // B, so a
    group is a run of whole samples, as the samples of a Ray router's train workers are."""
    out = []
    for s in seqs:
        B = s.mask_BN.shape[0]
        sample_T = torch.arange(B, device=s.mask_BN.device).repeat_interleave(s.mask_BN.sum(1))
        out.append(sample_T * groups // B)
    return torch.cat(out)

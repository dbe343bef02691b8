"""Turn images and captions into token sequences (B, N, D)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchStem(nn.Module):
    """ViT patch embedding: a stride-p convolution, one token per p x p patch."""

    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.num_tokens = (image_size // patch_size) ** 2

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)  # B,D,h,w -> B,N,D


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al., 2021): stride-2 3x3 convs down to one position per
    patch, then two residual 3x3 convs there. It sees local shape far better than one linear
    map per patch, for little compute; the patch side must be a power of two."""

    def __init__(self, image_size: int, patch_size: int, dim: int, width: int = 64):
        super().__init__()
        down, channels, stride = [], 3, 1
        while stride < patch_size:
            down += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GELU()]
            channels, stride = width, stride * 2
        self.down = nn.Sequential(*down)
        self.res = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2))
        self.proj = nn.Conv2d(channels, dim, 1)
        self.num_tokens = (image_size // patch_size) ** 2

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.down(images_BCHW)
        for conv in self.res:
            h = h + F.gelu(conv(h))
        return self.proj(h).flatten(2).transpose(1, 2)  # B,D,h,w -> B,N,D


class CNNStem(nn.Module):
    """The first stage of a torchvision ResNet-18 (stride 4), then a 1x1 projection to D."""

    def __init__(self, image_size: int, dim: int):
        super().__init__()
        import torchvision  # here, not at the top: importing it costs seconds in every Ray process

        resnet = torchvision.models.resnet18(weights=None)
        self.body = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                  resnet.layer1)
        self.proj = nn.Conv2d(64, dim, kernel_size=1)
        side = -(-image_size // 4)  # conv1 and maxpool each halve, rounding up
        self.num_tokens = side * side

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(images_BCHW)).flatten(2).transpose(1, 2)


TOKEN_INIT_STD = 0.02  # token embeddings start N(0, this^2); GloVe rows are scaled to it


class TextEmbedding(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, dim: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, context_length, dim))
        nn.init.normal_(self.tok.weight, std=TOKEN_INIT_STD)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids_BL: torch.Tensor) -> torch.Tensor:
        return self.tok(ids_BL) + self.pos[:, : ids_BL.shape[1]]

"""CLIP's symmetric contrastive loss with a learnable temperature."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned scale at 100


def clip_loss(image_BE: torch.Tensor, text_BE: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; pair i is the positive of row i."""
    logits_BB = logit_scale.exp() * image_BE @ text_BE.t()
    target_B = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    return 0.5 * (F.cross_entropy(logits_BB, target_B) + F.cross_entropy(logits_BB.t(), target_B))

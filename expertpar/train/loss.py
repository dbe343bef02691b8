"""CLIP's symmetric contrastive loss with a learnable temperature, and the caption decoder's
next-token cross-entropy."""
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


def caption_loss_sum(logits_BLV: torch.Tensor, target_BL: torch.Tensor,
                     mask_BL: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the real next tokens ([EOS] included, padding not): a sum, so
    data-parallel workers can divide by the global token count and match one process."""
    return F.cross_entropy(logits_BLV[mask_BL].float(), target_BL[mask_BL], reduction="sum")

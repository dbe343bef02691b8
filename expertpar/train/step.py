"""One training step, the same for one process and for data-parallel Ray Train workers.

forward -> CLIP loss over the global batch and/or the caption decoder's loss over the global
batch's tokens + auxiliary losses -> backward -> sum dense gradients over workers -> gradient
norms of every owner (dense, gates, experts) -> one global clip coefficient -> every owner
steps at the same boundary.

In process there is one owner (the whole model) and a world of one, so the collective calls are
no-ops; on Ray the dense parameters are owned here and the gates and experts by actors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from ..data import Batch
from ..moe import RouteContext, RoutingStats
from .loss import MAX_LOGIT_SCALE, caption_loss_sum, clip_loss
from .owners import Owner


class Collective(Protocol):
    rank: int
    world: int

    def gather(self, local_BE: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None: ...

    def barrier(self) -> None: ...


class SingleProcess:
    rank, world = 0, 1

    def gather(self, local_BE: torch.Tensor) -> torch.Tensor:
        return local_BE

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        pass

    def barrier(self) -> None:
        pass


class TorchDistributed:
    """The process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def gather(self, local_BE: torch.Tensor) -> torch.Tensor:
        """All workers' rows in rank order; only this worker's slice carries gradient."""
        parts = [torch.empty_like(local_BE) for _ in range(self.world)]
        dist.all_gather(parts, local_BE.detach().contiguous())
        parts[self.rank] = local_BE
        return torch.cat(parts)

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """One collective over a flat buffer, not one per tensor."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        start = 0
        for t in tensors:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()

    def barrier(self) -> None:
        dist.barrier()


def clip_coefficient(norms: torch.Tensor, max_norm: float) -> tuple[float, float]:
    """(global norm, coefficient every gradient is scaled by): the global norm is the norm of
    all per-parameter norms, whoever owns them; 0 disables clipping (coefficient 1)."""
    total = torch.linalg.vector_norm(norms.float()) if norms.numel() else torch.zeros(())
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0) if max_norm > 0 else torch.ones(())
    return float(total), float(coef)


@dataclass
class StepResult:
    metrics: dict[str, float]
    stats: dict[int, RoutingStats]  # MoE layer -> routing statistics of this step
    skipped: bool = False  # a non-finite loss or gradient: no owner stepped


def train_step(model, batch: Batch, ctx: RouteContext, owners: list[Owner], comm: Collective,
               grad_clip: float, lr: float) -> StepResult:
    """``owners[0]`` owns this process's parameters (the dense part on a Ray worker)."""
    local = owners[0]
    local.zero_grad()
    cfg = model.cfg
    contrastive = cfg.has_contrastive  # captioning alone needs no text tower
    # CoCa's weight is of the captioning term against the contrastive one: alone, it is 1.
    caption_weight = cfg.caption_loss_weight if contrastive else 1.0
    ids_BL, mask_BL = batch.ids_BL, batch.mask_BL
    enc = model.encode(batch.images_BCHW, ids_BL if contrastive else None,
                       mask_BL if contrastive else None, ctx)
    loss, metrics = torch.zeros((), device=enc.aux_loss.device), {}
    if contrastive:
        # The contrastive loss of the *global* batch: every worker computes it in full.
        loss_clip = clip_loss(comm.gather(enc.image_BE), comm.gather(enc.text_BE),
                              model.logit_scale)
        loss = loss + loss_clip
        metrics["loss/clip"] = loss_clip.item()
    if cfg.has_decoder:
        # Teacher forcing: position l reads tokens 0..l and predicts token l+1.
        logits_BLV = model.decode(enc.image_tokens_BND, ids_BL[:, :-1], mask_BL[:, :-1], ctx,
                                  enc)
        targets = mask_BL[:, 1:].sum().float().reshape(1)
        comm.all_reduce_sum_([targets])  # the global batch's: each worker's share of its mean
        loss_cap = caption_loss_sum(logits_BLV, ids_BL[:, 1:], mask_BL[:, 1:]) / targets[0]
        loss = loss + caption_weight * loss_cap
    # Each worker holds a 1/W share of the (global) auxiliary loss; the router sums the shares.
    loss = loss + enc.aux_loss / comm.world
    loss.backward()
    caption = loss_cap.detach().reshape(1).clone() if cfg.has_decoder else None
    if comm.world > 1:
        if contrastive:
            # Every worker's loss is the full global loss in the logit scale, so its gradient
            # would be counted W times by the sum below; per-sample parameters once each.
            model.logit_scale.grad.div_(comm.world)
        comm.all_reduce_sum_([p.grad for p in local.parameters if p.grad is not None]
                             + ([caption] if caption is not None else []))
    if caption is not None:
        metrics["loss/caption"] = caption.item()
    norm, coef = clip_coefficient(torch.cat([o.grad_norms(ctx.step) for o in owners]),
                                  grad_clip)
    total = (metrics.get("loss/clip", 0.0) + enc.aux_loss.item()
             + caption_weight * metrics.get("loss/caption", 0.0))
    # A NaN or inf in the loss or any gradient (the norm is global: every worker sees the same)
    # skips the step everywhere: dense, gates and experts keep their weights and AdamW state.
    finite = math.isfinite(norm) and math.isfinite(total)
    for owner in owners:
        if finite:
            owner.step(lr, coef)  # a remote owner's step may still run: its next call waits
        else:
            owner.skip()
    with torch.no_grad():  # CLIP: the learned temperature may not sharpen past 1/100
        model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
    metrics.update({"loss/total": total, "loss/aux": enc.aux_loss.item(),
                    "optim/grad_norm": norm, "model/logit_scale": model.logit_scale.exp().item()})
    metrics.update({f"aux/{k}": float(v) for k, v in enc.aux.items()})
    return StepResult(metrics, enc.stats, skipped=not finite)

"""One data-parallel training step on a Ray Train worker (or in the driver, with one worker).

Ownership: dense parameters are stepped here (identical on every worker after a summed
all-reduce), gates in the router, experts in their actors; all at the same step boundary with
the same global gradient-norm clipping as the in-process step.
"""
from __future__ import annotations

import ray
import torch
import torch.distributed as dist

from ..moe import RouteContext
from ..train.loss import MAX_LOGIT_SCALE, clip_loss
from ..train.optim import clipped_step


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batch(local_BE: torch.Tensor) -> torch.Tensor:
    """All workers' embeddings in rank order; only this worker's slice carries gradient."""
    rank, world = _world()
    if world == 1:
        return local_BE
    parts = [torch.empty_like(local_BE) for _ in range(world)]
    dist.all_gather(parts, local_BE.detach().contiguous())
    parts[rank] = local_BE
    return torch.cat(parts)


def allreduce_sum_(grads: list[torch.Tensor]) -> None:
    """Sum gradients over workers in one flat buffer (one collective, not one per tensor)."""
    _, world = _world()
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    start = 0
    for g in grads:
        g.copy_(flat[start:start + g.numel()].view_as(g))
        start += g.numel()


def distributed_train_step(model, optimizer, router, images, ids, mask, ctx: RouteContext,
                           grad_clip: float, lr: float) -> tuple[dict, dict]:
    rank, world = _world()
    enc = model.encode(images, ids, mask, ctx)
    # The contrastive loss of the *global* batch, as in process: every worker computes it.
    loss_clip = clip_loss(gather_batch(enc.image_BE), gather_batch(enc.text_BE),
                          model.logit_scale)
    # Each worker holds a 1/W share of the (global) auxiliary loss; the router sums the shares.
    loss = loss_clip + enc.aux_loss / world
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    dense = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if world > 1:
        # Every worker's loss is the full global loss in the logit scale, so its gradient is
        # counted W times by the sum below; per-sample parameters are counted once each.
        model.logit_scale.grad.div_(world)
    allreduce_sum_([p.grad for p in dense])
    norms = [torch.linalg.vector_norm(p.grad).cpu() for p in dense]  # beside the remote ones
    remote = ray.get(router.grad_norms.remote(ctx.step))
    norms += [torch.tensor(v) for _, v in remote]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = (torch.clamp(grad_clip / (total + 1e-6), max=1.0) if grad_clip > 0
            else torch.tensor(1.0))
    clipped_step(optimizer, lr, float(coef))
    if rank == 0:
        ray.get(router.step.remote(lr, float(coef)))
    if world > 1:
        dist.barrier()  # nobody routes step s+1 before the experts have taken step s
    with torch.no_grad():
        model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
    metrics = {"loss/total": loss_clip.item() + enc.aux_loss.item(), "loss/clip": loss_clip.item(),
               "loss/aux": enc.aux_loss.item(), "optim/grad_norm": total.item(),
               "model/logit_scale": model.logit_scale.exp().item()}
    metrics.update({f"aux/{k}": float(v) for k, v in enc.aux.items()})
    return metrics, enc.stats

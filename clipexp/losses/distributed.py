"""Gather embeddings across ranks so every rank's loss sees the global batch's negatives."""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def world_size() -> int:
    """Number of ranks (1 when torch.distributed is unavailable or not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns, to each rank, the sum over ranks of its slice's gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order), keeping the gradient.

    * Not distributed, or world size 1: returns ``tensor`` itself (identity, same object).
    * Floating tensors that require grad: every rank's slice is gathered and, in backward, each rank
      receives the sum over ranks of the gradient for its own slice (all_reduce; works on gloo and
      NCCL). Every rank computes the same global loss, so once DDP averages the parameter gradients
      the result is exactly the gradient of that loss.
    * Other tensors (group ids, labels, frozen features): plain ``all_gather``, no gradient.

    All ranks must pass the same shape (use ``drop_last=True`` on the training loader).
    """
    if world_size() == 1:
        return tensor
    if tensor.is_floating_point() and tensor.requires_grad:
        return _AllGatherWithGrad.apply(tensor)
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)

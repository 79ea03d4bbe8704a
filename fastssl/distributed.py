"""Rank/world helpers and collectives that are no-ops when ``torch.distributed`` is not initialised.

Contrastive and cross-correlation losses need the whole global batch: :func:`all_gather_grad`
concatenates every rank's ``[B, ...]`` tensor into ``[W*B, ...]`` and routes gradients back to
the rank that produced each row, so ``loss.backward()`` followed by DDP's gradient averaging
gives exactly the gradient of the loss computed on one process over the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_gather_grad",
    "all_gather_nograd",
    "all_reduce_sum",
    "all_reduce_mean",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available, initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherGrad(torch.autograd.Function):
    """Concatenate ``[B, ...]`` from all ranks along dim 0; backward sums the incoming
    gradients over ranks (every rank's loss may depend on every row) and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` → ``[W*B, ...]`` (rank order), differentiable. Identity when not distributed.

    All ranks must pass the same ``B``.
    """
    if not is_distributed():
        return x
    return _AllGatherGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` → ``[W*B, ...]`` without gradient (e.g. momentum keys). Identity when not distributed."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` unchanged). Identity when not distributed."""
    if not is_distributed():
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks. Identity when not distributed."""
    if not is_distributed():
        return x
    return all_reduce_sum(x) / dist.get_world_size()

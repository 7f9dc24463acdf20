"""Cross-rank gathers for the losses: the identity without an initialised process group, so single-process
runs never need torch.distributed."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """[B, ...] on every rank -> [world * B, ...] in rank order, without gradient. Every rank must pass the same B."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_with_grad(x: Tensor) -> Tensor:
    """[B, ...] -> [world * B, ...] in rank order; the backward pass sends each rank the gradient of its own slice
    (summed over ranks), so the mean of the per-rank losses has the gradient of the loss on the whole world batch."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x.contiguous()), dim=0)


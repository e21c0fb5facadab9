"""The few torch.distributed collectives s2h-fx uses, each a no-op without an
initialised process group (or with one rank): the loop and the decoupled
backward share them."""

from __future__ import annotations

import torch
from torch import nn


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if world_size() > 1 else 0


def agree(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (so every rank skips the same steps)."""
    if world_size() < 2:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def average(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean of each tensor over the ranks, with one all-reduce (as they are on
    one rank); new tensors, the inputs are left alone."""
    if world_size() < 2 or not tensors:
        return tensors
    flat = torch.cat([t.detach().flatten() for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.dtype, copy=True))
        offset += t.numel()
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Every rank takes rank 0's buffers."""
    if world_size() < 2:
        return
    for buf in module.buffers():
        torch.distributed.broadcast(buf, src=0)

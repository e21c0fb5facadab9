"""Counting FLOPs the one way the whole project does: ``torch.utils.flop_counter``
on one forward pass, without gradients, modules in eval mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[..., Any], *inputs: Any) -> int:
    """FLOPs of ``fn(*inputs)`` as ``FlopCounterMode`` counts them. A module (or the
    module a bound method belongs to) is put in eval mode for the count and
    restored afterwards, so BatchNorm running statistics are left alone."""
    module = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    was = module.training if isinstance(module, nn.Module) else None
    if isinstance(module, nn.Module):
        module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(*inputs)
    finally:
        if isinstance(module, nn.Module) and was is not None:
            module.train(was)
    return int(counter.get_total_flops())

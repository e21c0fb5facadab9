"""Counting FLOPs the one way the whole project does: ``torch.utils.flop_counter``
on one forward pass, without gradients, modules in eval mode, attention's fused
fast path off (:func:`counted_paths`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@contextlib.contextmanager
def counted_paths() -> Iterator[None]:
    """Run with the fused "fast path" of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` off. In eval mode without gradients torch takes
    it, and flop_counter does not count its kernel's attention (torchvision's
    vit_b_16: 22.5 of its 33.7 GFLOPs counted), so a dense model would look cheaper
    than the same network traced as its ops. The slow path computes the same function."""
    backend = getattr(torch.backends, "mha", None)
    if backend is None:
        yield
        return
    was = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(was)


def count_flops(fn: Callable[..., Any], *inputs: Any) -> int:
    """FLOPs of ``fn(*inputs)`` as ``FlopCounterMode`` counts them. A module (or the
    module a bound method belongs to) is put in eval mode for the count and
    restored afterwards, so BatchNorm running statistics are left alone."""
    module = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    was = module.training if isinstance(module, nn.Module) else None
    if isinstance(module, nn.Module):
        module.eval()
    try:
        with torch.no_grad(), counted_paths(), FlopCounterMode(display=False) as counter:
            fn(*inputs)
    finally:
        if isinstance(module, nn.Module) and was is not None:
            module.train(was)
    return int(counter.get_total_flops())

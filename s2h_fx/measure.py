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
    """Run with the attention kernels that flop_counter cannot see turned off:

    - the fused "fast path" of ``nn.MultiheadAttention`` and
      ``nn.TransformerEncoderLayer`` (taken in eval mode without gradients; its
      attention is not counted: torchvision's vit_b_16 had 22.5 of its 33.7 GFLOPs
      counted), so a dense model would look cheaper than the same network traced as
      its ops;
    - ``F.scaled_dot_product_attention``'s fused kernels: on the CPU its flash kernel
      has no FLOP formula in torch, and which kernel runs depends on the shapes
      (query/key and value head widths that differ take the math path, which is
      counted), so a pruned network's count would jump with its widths. The math
      path is counted as the two matrix products the formula for the fused kernels
      counts.

    Both are the same function as the paths they replace."""
    backend = getattr(torch.backends, "mha", None)
    was = backend.get_fastpath_enabled() if backend is not None else None
    if backend is not None:
        backend.set_fastpath_enabled(False)
    try:
        with _math_attention():
            yield
    finally:
        if backend is not None:
            backend.set_fastpath_enabled(was)


def _math_attention() -> Any:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - a torch without the selector
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


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

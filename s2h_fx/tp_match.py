"""Torch-Pruning at the same FLOPs as s2h-fx: the baseline network for latency comparisons.

``MetaPruner`` with L1 magnitude importance, the classifier ignored, widths rounded
to ``round_to`` (s2h-fx's divisor), and ``pruning_ratio`` bisected until the
pruned network's FLOPs ratio (``torch.utils.flop_counter``, same input) meets the
target. Each trial prunes a fresh deepcopy. ``torch_pruning`` is imported lazily.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from s2h_fx.measure import count_flops

log = logging.getLogger(__name__)

TRIALS = 8          # bisection trials for pruning_ratio
RATIO_TOL = 0.01    # stop when |FLOPs ratio - target| is below this
MAX_RATIO = 0.95    # upper end of the pruning_ratio search
MATCH_GAP = 0.05    # FLOPs of the two pruned networks further apart (relative) than this:
                    # not "the same FLOPs", and compared again at Torch-Pruning's


@dataclass(frozen=True)
class TPMatch:
    """The Torch-Pruning network closest to the target FLOPs ratio."""

    model: nn.Module
    pruning_ratio: float
    flops_ratio: float
    trials: int


def find_classifier(model: nn.Module, x: torch.Tensor) -> str | None:
    """Name of the last Conv/Linear that runs whose width is the output's (the number of
    classes); falls back to the last Conv/Linear that runs."""
    order: list[tuple[str, int]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            hooks.append(m.register_forward_hook(
                lambda *_, n=name, w=width: order.append((n, w))))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        return None
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dim() > 1]
    classes = leaves[0].shape[1] if leaves else None
    matching = [n for n, w in order if w == classes]
    return matching[-1] if matching else order[-1][0]


def prune_tp(model: nn.Module, x: torch.Tensor, ratio: float, *, round_to: int = 8,
             classifier: str | None = None) -> nn.Module:
    """A deepcopy of ``model`` pruned by Torch-Pruning at ``pruning_ratio=ratio``."""
    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    ignored = [work.get_submodule(classifier)] if classifier else []
    pruner = tp.pruner.MetaPruner(work, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=ignored,
                                  round_to=round_to)
    pruner.step()
    return work.eval()


def bisect_ratio(trial: Callable[[float], tuple[float, Any]], target: float, *,
                 trials: int = TRIALS, tol: float = RATIO_TOL) -> tuple[float, float, Any, int]:
    """Bisect ``ratio`` so that ``trial(ratio)[0]`` (a FLOPs ratio, falling as ``ratio``
    grows) meets ``target``. FLOPs fall about as (1 - ratio)^2: the first guess.

    Returns the closest trial: (ratio, its FLOPs ratio, what trial returned, trials run).
    """
    lo, hi = 0.0, MAX_RATIO
    ratio = min(max(1.0 - math.sqrt(max(target, 0.0)), lo), hi)
    best: tuple[float, float, float, Any] | None = None
    run = 0
    while run < trials:
        run += 1
        flops_ratio, result = trial(ratio)
        miss = abs(flops_ratio - target)
        if best is None or miss < best[0]:
            best = (miss, ratio, flops_ratio, result)
        if miss < tol:
            break
        lo, hi = (ratio, hi) if flops_ratio > target else (lo, ratio)
        ratio = (lo + hi) / 2
    if best is None:
        raise ValueError(f"trials must be at least 1, got {trials}")
    return best[1], best[2], best[3], run


def match_flops(model: nn.Module, x: torch.Tensor, target: float, *, round_to: int = 8,
                trials: int = TRIALS, tol: float = RATIO_TOL) -> TPMatch:
    """Torch-Pruning's network whose FLOPs ratio to ``model`` (on ``x``) is closest to
    ``target``, after at most ``trials`` bisection steps."""
    dense_flops = float(count_flops(model, x))
    classifier = find_classifier(model, x)

    def trial(ratio: float) -> tuple[float, nn.Module]:
        pruned = prune_tp(model, x, ratio, round_to=round_to, classifier=classifier)
        flops_ratio = float(count_flops(pruned, x)) / dense_flops
        log.info("torch-pruning: pruning_ratio %.4f gives FLOPs ratio %.4f (target %.4f)",
                 ratio, flops_ratio, target)
        return flops_ratio, pruned

    ratio, flops_ratio, pruned, run = bisect_ratio(trial, target, trials=trials, tol=tol)
    return TPMatch(pruned, ratio, flops_ratio, run)

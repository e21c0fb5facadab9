"""One-shot widths: a global greedy choice that meets a FLOPs budget, dropping the
channels that cost least L1 importance per FLOP saved (the no-training baseline
that S2H training must beat; also the final projection after training).

Any :class:`~s2h_fx.cost.CostModel` stands for the FLOPs model: the same greedy
meets a parameter or latency budget (``what`` names the cost in messages)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from s2h_fx.channels import GroupingResult
from s2h_fx.cost import CostModel
from s2h_fx.errors import BudgetError

log = logging.getLogger(__name__)


def _divisors(groups: Any) -> str:
    found = sorted({grp.divisor for grp in groups})
    return ", ".join(map(str, found)) if len(found) <= 3 else f"{found[0]} to {found[-1]}"


def choose_widths(
    flops: CostModel, grouping: GroupingResult, importance: dict[int, np.ndarray], budget: float,
    start: dict[int, int] | None = None, what: str = "FLOPs",
) -> dict[int, int]:
    """Greedy: repeatedly shrink the group that loses least importance per FLOP saved,
    from ``start`` (default: full widths) until the FLOPs fit the budget."""
    groups = {g.index: g for g in grouping.prunable}
    widths = {g: grp.size for g, grp in groups.items()}
    widths.update(start or {})
    target = budget * flops.total
    floor = flops({g: grp.divisor for g, grp in groups.items()})
    if floor > target + 1e-6 * flops.total:
        frozen = flops({g: 0 for g in groups})
        raise BudgetError(
            f"budget {budget:g} asks for {target:.4g} {what}, but the smallest network the "
            f"groups allow costs {floor:.4g} ({floor / flops.total:.3f} of the full "
            f"{flops.total:.4g}); the frozen part alone costs {frozen:.4g} "
            f"({frozen / flops.total:.3f}). Raise the budget, freeze fewer channels or "
            f"prune in finer steps (every group stops at its divisor, here "
            f"{_divisors(groups.values())})."
        )
    # per group: atom importances in the order they would be dropped
    order = {}
    for g in groups:
        atom_score = np.bincount(grouping.atom_of_class[g], weights=importance[g])
        order[g] = np.sort(atom_score)
    terms_of: dict[int, list[Any]] = {g: [] for g in groups}
    for t in flops.terms:
        for g in t.groups:
            terms_of[g].append(t)
    current = flops(widths)

    saves: dict[int, float] = {}  # FLOPs one more step of each group saves

    def score(g: int) -> float:
        grp = groups[g]
        if widths[g] - grp.divisor < grp.divisor:
            return np.inf
        trial = {**flops.sizes, **widths}
        before = sum(t.at(trial, flops.sizes) for t in terms_of[g])
        trial[g] -= grp.divisor
        saved = saves[g] = before - sum(t.at(trial, flops.sizes) for t in terms_of[g])
        if saved <= 0:
            return np.inf
        dropped = (grp.size - widths[g]) // grp.atom  # atoms are dropped least important first
        cost = order[g][dropped : dropped + grp.divisor // grp.atom].sum()
        return float(cost / saved)

    scores = {g: score(g) for g in groups}
    neighbours = {g: {h for t in terms_of[g] for h in t.groups} for g in groups}
    while current > target:
        g = min(scores, key=lambda k: (scores[k], k))
        if not np.isfinite(scores[g]):
            break
        widths[g] -= groups[g].divisor
        # only g's terms change: subtract what they save (in the model's units: a
        # latency model scales its terms' sum), and count in full near the end
        current -= flops.scale * saves[g]
        if current <= target * (1 + 1e-6):
            current = flops(widths)
        for h in neighbours[g] | {g}:
            scores[h] = score(h)
    current = flops(widths)
    log.info("one-shot widths: %.4f of full %s (budget %.4f)", current / flops.total, what,
             budget)
    return widths


def grow_widths(
    flops: CostModel, grouping: GroupingResult, importance: dict[int, np.ndarray],
    ranks: dict[int, np.ndarray], ceiling: float, start: dict[int, int],
) -> dict[int, int]:
    """Greedy inverse of :func:`choose_widths`: while the FLOPs stay within ``ceiling``
    (a fraction of the full FLOPs), give back the channels that add the most
    importance per FLOP."""
    groups = {g.index: g for g in grouping.prunable}
    widths = dict(start)
    limit = ceiling * flops.total
    while True:
        best, best_score = None, 0.0
        current = flops(widths)
        for g, grp in groups.items():
            if widths[g] + grp.divisor > grp.size:
                continue
            trial = {**widths, g: widths[g] + grp.divisor}
            cost = flops(trial)
            if cost > limit or cost <= current:
                continue
            nxt = (ranks[g] >= widths[g]) & (ranks[g] < widths[g] + grp.divisor)
            score = float(importance[g][nxt].sum()) / (cost - current)
            if score > best_score:
                best, best_score = g, score
        if best is None:
            return widths
        widths[best] += groups[best].divisor

"""One-shot widths: a global greedy choice that meets a budget by dropping, step by step,
the divisor step of channels (least important first within a group) that is worth least
per unit of cost saved. The no-training baseline that S2H training must beat; also the
final projection into the budget after training (S2H itself trains from full width).

What a step is worth is the rule (``PruneConfig.one_shot``):

- ``"per-cost"`` (default): the step's L1 importance (every producer's norms scaled to
  mean 1, so a channel is worth about 1 anywhere) per unit of cost saved. A channel
  that many layers read saves the most cost, so narrow residual streams go first,
  often down to one divisor step, while expansion and depthwise channels stay: the
  FLOPs go, but the time of the memory-bound work on the wide maps (depthwise
  convolutions, squeeze-excitation, activations) stays.
- ``"share"``: the share of its group's kept importance that the step drops, times the
  cost the group's layers carry at the current widths, per unit of cost saved. Where
  a cost is linear in the group's width (every FLOPs and parameter term is: a layer
  between two groups costs their widths' product) carried / saved is the kept width
  over the step, so the cost cancels and steps compare by their importance against
  the mean of their group's kept channels: the channels least important within their
  own group go first, whatever they cost (the global ranking of mean-normalised
  magnitudes that Torch-Pruning's ``global_pruning`` uses, normalised again as a
  group narrows). Where importance is flat the widths follow its small differences:
  a group averaged over many producers (a residual stream) has the flattest and
  keeps the most. With a latency budget, only the tables' uneven steps make the cost
  count.

The README's one-shot study has what each costs: efficiency on eager, ``compile`` and
ONNX Runtime (speed-up times FLOPs ratio) and accuracy after fine-tuning.

Any :class:`~s2h_fx.cost.CostModel` stands for the cost: the same greedy meets a
FLOPs, parameter or latency budget (``what`` names the cost in messages)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from s2h_fx.channels import GroupingResult
from s2h_fx.config import ONE_SHOT_RULES
from s2h_fx.cost import CostModel
from s2h_fx.errors import BudgetError

log = logging.getLogger(__name__)

_TINY = 1e-30  # a group whose kept channels all have zero importance: any step is free


def step_worth(rule: str, step: float, kept: float, carried: float, change: float) -> float:
    """What a step of ``step`` importance is worth per unit of cost it changes
    (``change`` > 0), in a group whose kept channels (the step's included) hold
    ``kept`` importance and whose layers cost ``carried`` at the current widths."""
    _check_rule(rule)
    if rule == "per-cost":
        return step / change
    return step / max(kept, _TINY) * carried / change


def _check_rule(rule: str) -> None:
    if rule not in ONE_SHOT_RULES:
        raise ValueError(f"one-shot rule must be one of {', '.join(ONE_SHOT_RULES)}; "
                         f"got {rule!r}")


def _terms_of(flops: CostModel, groups: Any) -> dict[int, list[Any]]:
    """Per group, the cost terms whose value depends on its width."""
    terms_of: dict[int, list[Any]] = {g: [] for g in groups}
    for t in flops.terms:
        for g in t.groups:
            terms_of[g].append(t)
    return terms_of


def _divisors(groups: Any) -> str:
    found = sorted({grp.divisor for grp in groups})
    return ", ".join(map(str, found)) if len(found) <= 3 else f"{found[0]} to {found[-1]}"


def choose_widths(
    flops: CostModel, grouping: GroupingResult, importance: dict[int, np.ndarray], budget: float,
    start: dict[int, int] | None = None, what: str = "FLOPs", rule: str = "per-cost",
) -> dict[int, int]:
    """Greedy: repeatedly shrink the group whose next step is worth least per unit of
    cost saved (``rule``, :func:`step_worth`), from ``start`` (default: full widths)
    until the cost fits the budget."""
    _check_rule(rule)
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
    terms_of = _terms_of(flops, groups)
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
        step = order[g][dropped : dropped + grp.divisor // grp.atom].sum()
        return step_worth(rule, float(step), float(order[g][dropped:].sum()), before, saved)

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
    rule: str = "per-cost",
) -> dict[int, int]:
    """Greedy inverse of :func:`choose_widths`: while the cost stays within ``ceiling``
    (a fraction of the full cost), give back the step worth most per unit of cost
    added (``rule``, :func:`step_worth`)."""
    _check_rule(rule)
    groups = {g.index: g for g in grouping.prunable}
    terms_of = _terms_of(flops, groups)
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
            gain = float(importance[g][nxt].sum())
            kept = float(importance[g][ranks[g] < widths[g]].sum()) + gain
            sizes = {**flops.sizes, **trial}
            carried = sum(t.at(sizes, flops.sizes) for t in terms_of[g])
            score = step_worth(rule, gain, kept, carried, cost - current)
            if score > best_score:
                best, best_score = g, score
        if best is None:
            return widths
        widths[best] += groups[best].divisor

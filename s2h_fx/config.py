"""Configuration of a pruning run (frozen, validated on construction)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from s2h_fx.errors import BudgetError


@dataclass(frozen=True)
class PruneConfig:
    """``budget``: fraction of the whole network's FLOPs the pruned network keeps.

    ``divisor``: widths are multiples of it where a group allows (default 8).
    ``strict``: raise on ops without a coupling rule instead of freezing them.
    """

    budget: float
    divisor: int = 8
    strict: bool = False

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, dict):
            if set(b) != {"flops"}:
                raise BudgetError(f"budget dict supports only the key 'flops', got {sorted(b)}")
            b = b["flops"]
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise BudgetError(
                f"budget must be a number in (0, 1], the fraction of FLOPs to keep; "
                f"got {b!r} of type {type(b).__name__}"
            )
        if math.isnan(b) or not 0 < b <= 1:
            raise BudgetError(f"budget must be in (0, 1] (fraction of FLOPs kept); got {b}")
        object.__setattr__(self, "budget", float(b))
        if not isinstance(self.divisor, int) or self.divisor < 1:
            raise ValueError(f"divisor must be a positive integer, got {self.divisor!r}")

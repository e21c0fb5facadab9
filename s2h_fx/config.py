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


SETTLE_MODES = ("distill", "hard")


@dataclass(frozen=True)
class S2HConfig:
    """Hyper-parameters of S2H training (DESIGN.md section 3).

    ``temperature``: T of the width softmax. ``resource_weight``: lambda_R of the
    resource loss. ``kd_weight``: weight of both distillation terms.
    ``mask_lr``: step size of the mask optimiser. ``tolerance``: FLOPs-ratio band
    around the budget inside which the task gradient leads the mask update.
    ``balance_cap``: how far the resource gradient may outweigh the task gradient.
    ``fix_importance``: keep the channel order from the start instead of
    recomputing it after every mask step.

    Candidate training changes, off by default (today's behaviour):
    ``mask_momentum``: momentum in [0, 1) of the mask optimiser over its combined
    step direction, as torch's SGD (0: none); ``mask_nesterov``: Nesterov momentum
    (needs ``mask_momentum > 0``). ``mask_lr_follows_schedule``: in ``fit`` the mask
    step size is ``mask_lr`` times the weights' schedule factor (lr now / base lr).
    ``settle_epochs``: the last this many S2H epochs of ``fit`` keep the architecture
    fixed (no mask step: logits, ranks and widths stay) while the weights keep
    training with the same losses and decoupled backward; must be smaller than
    ``fit``'s ``epochs`` when nonzero. A user's own loop settles by not calling
    ``mask_step``.
    """

    temperature: float = 1.0
    resource_weight: float = 1.0
    kd_weight: float = 1.0
    mask_lr: float = 0.05
    tolerance: float = 0.005
    balance_cap: float = 10.0
    fix_importance: bool = False
    mask_momentum: float = 0.0
    mask_nesterov: bool = False
    mask_lr_follows_schedule: bool = False
    settle_epochs: int = 0
    settle_mode: str = "distill"
    descent_epochs: float = 0.0

    def __post_init__(self) -> None:
        for name in ("temperature", "mask_lr", "tolerance", "balance_cap"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not float(value) > 0:
                raise ValueError(f"S2HConfig.{name} must be a positive number, got {value!r}")
        for name in ("resource_weight", "kd_weight"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or float(value) < 0 or math.isnan(value):
                raise ValueError(f"S2HConfig.{name} must be >= 0, got {value!r}")
        self._check_options()

    def _check_options(self) -> None:
        m = self.mask_momentum
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 <= float(m) < 1:
            raise ValueError(f"S2HConfig.mask_momentum must be a number in [0, 1), got {m!r}")
        for name in ("mask_nesterov", "mask_lr_follows_schedule"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"S2HConfig.{name} must be True or False, "
                                 f"got {getattr(self, name)!r}")
        if self.mask_nesterov and not float(m) > 0:
            raise ValueError("S2HConfig.mask_nesterov needs mask_momentum > 0")
        if self.settle_mode not in SETTLE_MODES:
            raise ValueError(f"S2HConfig.settle_mode must be one of {', '.join(SETTLE_MODES)}, "
                             f"got {self.settle_mode!r}")
        d = self.descent_epochs
        if (isinstance(d, bool) or not isinstance(d, numbers.Real) or math.isnan(d)
                or float(d) < 0):
            raise ValueError(f"S2HConfig.descent_epochs must be a number >= 0, got {d!r}")
        s = self.settle_epochs
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"S2HConfig.settle_epochs must be an integer >= 0, got {s!r}")

"""Configuration of a pruning run (frozen, validated on construction)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from s2h_fx.errors import BudgetError

BUDGET_KINDS = ("flops", "params", "latency")
DEFAULT_DIVISOR = 8
# (runtime, device) -> the divisor its kernels run best at, where measured (the README's
# divisor study, batch 32, budget 0.5: the share of the speed-up its FLOPs promise at
# divisor 8 / 16 / 32): ONNX Runtime on CPU ran mobilenet_v2 at 0.71 / 0.82 / 0.91,
# resnet50 at 0.96 / 0.98 / 0.98; eager on CPU mobilenet_v2 0.55 / 0.67 / 1.07, resnet50
# 0.80 / 0.92 / 1.02; torch.compile on CPU mobilenet_v2 0.66 / 0.78 / 0.95, resnet50
# 0.90 / 0.97 / 0.97. Not measured on a GPU yet: 8 there.
RUNTIME_DIVISORS: dict[tuple[str, str], int] = {
    ("onnxruntime", "cpu"): 32, ("eager", "cpu"): 32, ("compile", "cpu"): 32}


def default_divisor(runtime: str | None = None, device: str = "cpu") -> int:
    """The divisor a run uses when none is given: the runtime's where one was measured
    to gain from wider steps (:data:`RUNTIME_DIVISORS`), else 8."""
    if runtime is None:
        return DEFAULT_DIVISOR
    return RUNTIME_DIVISORS.get((runtime, str(device).split(":")[0]), DEFAULT_DIVISOR)
# keys a latency budget dict may carry besides the kind itself
LATENCY_OPTIONS = ("runtime", "batch", "threads", "device", "cache_dir", "points",
                   "landing")
LANDING_ROUNDS = 2  # re-choices of the widths after timing the chosen network
# a timed latency ratio this far below the budget (and not above it by more than the
# export's tolerance, S2HConfig.tolerance) needs no re-choice: two timings of one
# network on a 2-core machine differ by about 0.02-0.04
LANDING_TOLERANCE = 0.02
# fit recalibrates a latency model through the trained network where its predicted
# ratio is this close to the budget (the descent is over)
RECALIBRATE_NEAR = 0.05
GRID_POINTS = 4  # grid points per axis of a latency table (smallest and full size included)
# what an attention block prunes: each head's width (heads stay whole), or whole heads,
# or both (whole heads and the width of those kept), or (auto) both where whole heads
# leave no fewer channels prunable than widths (see PruneConfig)
ATTENTION_MODES = ("auto", "width", "heads", "both")
# how the one-shot widths value a step of channels (s2h_fx.one_shot.step_worth)
ONE_SHOT_RULES = ("per-cost", "share")


@dataclass(frozen=True)
class PruneConfig:
    """``budget``: the fraction of the whole network's cost the pruned network keeps.

    A number is a FLOPs budget. A dict names its kind: ``{"flops": 0.5}``,
    ``{"params": 0.4}`` (parameters), or ``{"latency": 0.5, "runtime": "onnxruntime",
    "batch": 1}``: the fraction of the dense network's latency measured on that
    runtime, batch and thread count (``threads``, default the runtime's own;
    ``device``, default ``"cpu"``; ``cache_dir`` of the latency tables, default
    ``~/.cache/s2h-fx``; ``points``, grid points per axis of a layer's latency table,
    default 4; ``landing``, how many times the widths may be chosen again after the
    chosen network is timed against the dense one, default 2, 0 for none, and then
    ``fit`` does not time the trained network either: see
    :meth:`s2h_fx.Pruner.land_latency_budget`, :meth:`s2h_fx.Pruner.recalibrate_latency`). After validation ``budget`` is the
    fraction (a float) and ``kind``, ``runtime``, ``batch``, ``threads``, ``device``,
    ``cache_dir``, ``points``, ``landing`` hold the rest.

    ``divisor``: widths are multiples of it where a group allows (default None: 8, or
    for a latency budget the runtime's own, :func:`default_divisor`: 32 for eager,
    ``compile`` and ONNX Runtime on the CPU, 8 on a GPU until measured there).
    ``strict``: raise on ops without a coupling rule instead of freezing them.
    ``attention``: ``"width"`` prunes the width of every attention head (the same
    channels in each head; the heads stay whole); ``"heads"`` prunes whole heads (q, k
    and v rows of a head, the output projection's columns, and per-head tables such as
    relative position biases; the head width stays); ``"both"`` prunes whole heads and
    the width of the heads kept (a channel of a head is kept when its head and its
    position in the head's width are: two groups per block of attention, the heads and
    the widths; not with a latency budget); ``"auto"`` (default) prunes
    both where the graph computes attention and whole heads leave at least as many of
    the convs' and linears' output channels prunable as head widths; else the widths,
    or whole heads alone where they prune more (rotary position embeddings keep the
    head width: their attention prunes by heads). With a latency budget ``"auto"``
    never picks both. ``pruner.grouping.attention`` says which was used.

    ``one_shot``: how the one-shot widths (before training; also the projection into
    the budget after it) choose the channels they drop: ``"per-cost"`` (default) least
    L1 importance per unit of cost saved; ``"share"`` least importance against the
    rest of its own group. See :mod:`s2h_fx.one_shot`.
    """

    budget: float
    divisor: int | None = None
    strict: bool = False
    kind: str = "flops"
    runtime: str | None = None
    batch: int = 1
    threads: int | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    points: int = GRID_POINTS
    landing: int = LANDING_ROUNDS
    attention: str = "auto"
    one_shot: str = "per-cost"

    def __post_init__(self) -> None:
        if self.one_shot not in ONE_SHOT_RULES:
            raise ValueError(
                f"one_shot must be one of {', '.join(map(repr, ONE_SHOT_RULES))} (drop the "
                "channels of least importance per unit of cost saved, or of least importance "
                f"against the rest of their group); got {self.one_shot!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(
                f"attention must be one of {', '.join(map(repr, ATTENTION_MODES))} (prune "
                "each head's width, whole heads, both, or both where heads prune no less "
                f"than widths); got {self.attention!r}")
        b = self.budget
        if isinstance(b, dict):
            b = self._from_dict(b)
        if self.kind not in BUDGET_KINDS:
            raise BudgetError(f"unknown budget kind {self.kind!r}; choose from "
                              f"{', '.join(BUDGET_KINDS)}")
        what = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}[self.kind]
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise BudgetError(
                f"budget must be a number in (0, 1], the fraction of {what} to keep; "
                f"got {b!r} of type {type(b).__name__}"
            )
        if math.isnan(b) or not 0 < b <= 1:
            raise BudgetError(f"budget must be in (0, 1] (fraction of {what} kept); got {b}")
        object.__setattr__(self, "budget", float(b))
        self._check_latency()
        if self.kind == "latency" and self.attention == "both":
            raise BudgetError("a latency budget cannot prune with attention='both' (its "
                              "tables time a layer's width, not heads x head widths): "
                              "use attention='width', 'heads' or 'auto'")
        if self.divisor is None:
            object.__setattr__(self, "divisor", default_divisor(
                self.runtime if self.kind == "latency" else None, self.device))
        if isinstance(self.divisor, bool) or not isinstance(self.divisor, int) or self.divisor < 1:
            raise ValueError(f"divisor must be a positive integer, got {self.divisor!r}")

    def _from_dict(self, b: dict[str, object]) -> object:
        kinds = [k for k in b if k in BUDGET_KINDS]
        if len(kinds) != 1:
            raise BudgetError(f"a budget dict names exactly one kind of {', '.join(BUDGET_KINDS)}"
                              f" (e.g. {{'params': 0.4}}); got keys {sorted(map(str, b))}")
        kind = kinds[0]
        extra = sorted(str(k) for k in b if k != kind)
        allowed = LATENCY_OPTIONS if kind == "latency" else ()
        bad = [k for k in extra if k not in allowed]
        if bad:
            raise BudgetError(f"unknown key(s) {bad} in a {kind} budget; "
                              + (f"a latency budget takes {', '.join(LATENCY_OPTIONS)}"
                                 if kind == "latency" else f"a {kind} budget takes none"))
        object.__setattr__(self, "kind", kind)
        for k in extra:
            object.__setattr__(self, k, b[k])
        return b[kind]

    def _check_latency(self) -> None:
        if self.kind != "latency":
            if self.runtime is not None:
                raise BudgetError(f"runtime {self.runtime!r} is for latency budgets; this one "
                                  f"is a {self.kind} budget")
            return
        if not self.runtime:
            raise BudgetError("a latency budget needs a runtime, e.g. {'latency': 0.5, "
                              "'runtime': 'onnxruntime', 'batch': 1}")
        if not isinstance(self.runtime, str):
            raise BudgetError(f"runtime must be a name, got {self.runtime!r}")
        b = self.batch
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise BudgetError(f"batch must be a positive integer, got {b!r}")
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise BudgetError(f"threads must be a positive integer or None, got {t!r}")
        p = self.points
        if isinstance(p, bool) or not isinstance(p, int) or p < 2:
            raise BudgetError(f"points must be an integer >= 2 (grid points per axis of a "
                              f"latency table, the smallest and full sizes included), got {p!r}")
        n = self.landing
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise BudgetError(f"landing must be an integer >= 0 (times the widths may be "
                              f"chosen again after timing the chosen network), got {n!r}")


SETTLE_MODES = ("distill", "hard")
DESCENT_SHAPES = ("linear", "geometric")
# the defaults of S2HConfig.descent_epochs / settle_epochs (None): shares of fit's epochs
DESCENT_SHARE = 0.3
SETTLE_SHARE = 0.6


@dataclass(frozen=True)
class S2HConfig:
    """Hyper-parameters of S2H training (soft and hard branches, masks, resource loss).

    ``temperature``: T of the width softmax. ``resource_weight``: lambda_R of the
    resource loss. ``kd_weight``: weight of both distillation terms.
    ``mask_lr``: step size of the mask optimiser. ``tolerance``: FLOPs-ratio band
    around the budget inside which the task gradient leads the mask update.
    ``balance_cap``: how far the resource gradient may outweigh the task gradient.
    ``fix_importance``: keep the channel order from the start instead of
    recomputing it after every mask step.

    How ``fit`` trains (the defaults were chosen by ``benchmarks/quality.py``'s
    ablation; see the README): the mask optimiser keeps a momentum buffer
    (``mask_momentum`` in [0, 1), as torch's SGD; ``mask_nesterov``: Nesterov
    momentum, needs ``mask_momentum > 0``) and its step size is ``mask_lr`` times
    the weights' schedule factor (lr now / base lr) when
    ``mask_lr_follows_schedule``. ``descent_epochs``: the target cost ratio (FLOPs
    unless the budget says otherwise) of the resource loss and the mask step falls
    from 1 (the full network) to the budget along a half cosine over this many epochs (0: the budget from the start);
    ``descent_shape`` says in what: ``"linear"`` in the ratio itself (equal cuts of
    the cost), ``"geometric"`` in its logarithm (equal *relative* cuts: at budget
    0.15 the last third of the descent goes from 0.24 to 0.15 where a linear one
    goes from 0.36).
    ``settle_epochs``: the last this many epochs keep the architecture fixed (it is
    projected into the budget band first, then no mask step: logits, ranks and
    widths stay) while the weights train on; ``settle_mode`` says how: ``"hard"``
    trains the hard network alone on the task loss (the soft branch does not run),
    ``"distill"`` keeps the two branches, their losses and the decoupled backward.
    Must be smaller than ``fit``'s ``epochs`` when nonzero. ``None`` (the default of
    both) is a share of ``fit``'s epochs: :data:`DESCENT_SHARE` and
    :data:`SETTLE_SHARE` (see :meth:`phases`). A user's own loop descends with
    :meth:`Pruner.set_target_ratio` and settles by not calling ``mask_step``.
    """

    temperature: float = 1.0
    resource_weight: float = 1.0
    kd_weight: float = 1.0
    mask_lr: float = 0.01
    tolerance: float = 0.005
    balance_cap: float = 10.0
    fix_importance: bool = False
    mask_momentum: float = 0.9
    mask_nesterov: bool = True
    mask_lr_follows_schedule: bool = True
    settle_epochs: int | None = None
    settle_mode: str = "hard"
    descent_epochs: float | None = None
    descent_shape: str = "linear"

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
        if self.descent_shape not in DESCENT_SHAPES:
            raise ValueError(f"S2HConfig.descent_shape must be one of {', '.join(DESCENT_SHAPES)}, "
                             f"got {self.descent_shape!r}")
        d = self.descent_epochs
        if d is not None and (isinstance(d, bool) or not isinstance(d, numbers.Real)
                              or math.isnan(d) or float(d) < 0):
            raise ValueError(f"S2HConfig.descent_epochs must be a number >= 0 or None, got {d!r}")
        s = self.settle_epochs
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise ValueError(f"S2HConfig.settle_epochs must be an integer >= 0 or None, "
                             f"got {s!r}")

    def phases(self, epochs: int) -> tuple[float, int]:
        """(descent epochs, settling epochs) of an S2H run of ``epochs`` epochs: the
        fields where set, else their share of ``epochs`` (:data:`DESCENT_SHARE`,
        :data:`SETTLE_SHARE`; at least one epoch of search is left)."""
        descent = DESCENT_SHARE * epochs if self.descent_epochs is None else self.descent_epochs
        if self.settle_epochs is not None:
            return float(descent), self.settle_epochs
        return float(descent), max(0, min(round(SETTLE_SHARE * epochs), epochs - 1))

"""The public entry point: :func:`prune_graph` and the :class:`Pruner` module.

Life cycle: ``prune_graph`` prepares (trace, group, masks, one-shot widths
written into the masks), training moves the masks (``fit`` or the user's loop),
``export`` emits the hard network of the masks, within the budget. The masks
are the one state of the widths (:mod:`s2h_fx.state`); the pruner delegates the
hard branch to :mod:`s2h_fx.hard`, the losses and the decoupled backward to
:mod:`s2h_fx.distill` and the mask update to :mod:`s2h_fx.mask_optim`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Iterable, Iterator
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _NormBase

from s2h_fx.channels import GroupingResult
from s2h_fx.config import LANDING_TOLERANCE, RECALIBRATE_NEAR, PruneConfig, S2HConfig
from s2h_fx.copying import BufferSnapshot
from s2h_fx.cost import (
    COST_NAMES,
    CostModel,
    build_cost_model,
    latency_input,
    runtime_measure,
)
from s2h_fx.distill import decoupled_backward, s2h_losses
from s2h_fx.errors import (
    BudgetError,
    InputError,
    InvariantError,
    NonFiniteError,
    NoPrunableChannelsError,
)
from s2h_fx.hard import HardStats, recalibrate, run_hard, running_stat_buffers
from s2h_fx.importance import Importance, keep_from_ranks, rank_with_first
from s2h_fx.mask_optim import MaskOptimizer
from s2h_fx.masks import ChannelMask
from s2h_fx.one_shot import choose_widths, grow_widths
from s2h_fx.passes import (  # noqa: I001
    build_flops_model,
    emit_pruned,
    find_channel_groups,
    insert_masks,
    trace_model,
)
from s2h_fx.passes.build_flops_model import FlopsModel
from s2h_fx.passes.insert_masks import mask_name
from s2h_fx.passes.plan_surgery import SurgeryPlan, plan_surgery
from s2h_fx.state import WidthState

log = logging.getLogger(__name__)


class _GcPaused(contextlib.ContextDecorator):
    """Run with the cyclic garbage collector paused (and restored after).

    The prepare and export passes allocate many small objects (graph nodes,
    channel layouts) and drop few of them, so the collector's passes over the
    whole heap find little: on timm's BEiT-v2 base, about fifty collections took
    0.65 s of a 5 s prepare and export in one measurement. Reference counting still
    frees everything that is not in a cycle; the collector runs as usual afterwards
    (and during a latency budget's measurements, which deploy whole networks)."""

    def _recreate_cm(self) -> _GcPaused:  # a fresh state for every decorated call
        return type(self)()

    def __enter__(self) -> None:
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.was_enabled:
            gc.enable()


def prune_graph(
    model: nn.Module,
    budget: float | dict[str, Any],
    example_inputs: tuple[Any, ...] | None = None,
    *,
    divisor: int | None = None,
    strict: bool = False,
    attention: str = "auto",
    config: S2HConfig | None = None,
    latency_measure: Any = None,
    one_shot: str = "per-cost",
) -> Pruner:
    """Trace ``model``, group its coupled channels, insert masks and choose widths.

    ``budget`` is the fraction of the whole network's FLOPs (as
    ``torch.utils.flop_counter`` counts them on ``example_inputs``) to keep.
    The user's model is not modified; the pruner takes its train/eval mode.
    The one-shot widths are written into the masks, so the pruner in either
    mode, and ``export()``, are at the budget from the start. ``config`` holds
    S2H training settings. ``divisor``: widths are multiples of it where a group
    allows; None: 8, or for a latency budget its runtime's (32 for every runtime on
    the CPU, see :func:`s2h_fx.config.default_divisor`).

    ``budget`` may name its kind (see :class:`~s2h_fx.config.PruneConfig`):
    ``{"params": 0.4}``, or ``{"latency": 0.5, "runtime": "onnxruntime", "batch": 1}``
    (layer latency tables are measured on that runtime, or by ``latency_measure``,
    a :class:`s2h_fx.latency.Measure`, and cached on disk).

    ``attention``: ``"width"`` prunes each attention head's width, ``"heads"`` whole
    heads, ``"both"`` whole heads and the width of those kept, ``"auto"`` (default)
    both where whole heads prune no fewer channels than widths (see
    :class:`~s2h_fx.config.PruneConfig`).

    ``one_shot``: how the one-shot widths choose the channels they drop:
    ``"per-cost"`` (default) or ``"share"`` (see :mod:`s2h_fx.one_shot`).
    """
    prune_config = PruneConfig(budget, divisor, strict,  # type: ignore[arg-type]
                               attention=attention, one_shot=one_shot)
    if example_inputs is None:
        raise InputError(
            "example_inputs is required to trace shapes, e.g. "
            "prune_graph(model, 0.5, example_inputs=(torch.randn(1, 3, 224, 224),))"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    with _GcPaused():
        gm = trace_model(model, tuple(example_inputs))
        grouping = find_channel_groups(gm, divisor=cast(int, prune_config.divisor),  # PruneConfig sets it
                                       strict=prune_config.strict,
                                       attention=prune_config.attention,
                                       # latency tables time a width, not heads x widths
                                       auto_both=prune_config.kind != "latency")
        if not grouping.prunable:
            raise NoPrunableChannelsError(
                f"{type(model).__name__} has no prunable channel group; why each is frozen:\n"
                + grouping.table()
            )
        flops = build_flops_model(gm, grouping)
    measure = runtime_measure(prune_config, latency_measure)
    cost = build_cost_model(prune_config, gm, grouping, flops, tuple(example_inputs), measure)
    with _GcPaused():
        gm = insert_masks(gm, grouping)
        pruner = Pruner(gm, grouping, flops, prune_config, config or S2HConfig(), cost)
    if prune_config.kind == "latency" and prune_config.landing:
        x = latency_input(prune_config, tuple(example_inputs))
        pruner.land_latency_budget(measure, x, prune_config.landing)
        pruner.latency_probe = (measure, x)  # fit times the trained network too
    pruner.train(model.training)
    return pruner


# the end of each out-of-reach message of landing
_UNMEASURED = " (landing=0 in the budget keeps the unmeasured choice)"


def _next_target(tried: list[tuple[float, Any, float, float]], budget: float) -> float:
    """The chooser's next target, from (target, widths, predicted, measured) of the
    networks timed, in the model's predicted ratio (the chooser stops at or just below
    its target): between the nearest two on either side of the budget where both
    sides have one (linear in the measured ratio), else the last prediction scaled
    by budget / measured."""
    below = [t for t in tried if t[3] < budget]
    above = [t for t in tried if t[3] > budget]
    if below and above:
        lo, hi = max(below, key=lambda t: t[3]), min(above, key=lambda t: t[3])
        return lo[2] + (budget - lo[3]) * (hi[2] - lo[2]) / (hi[3] - lo[3])
    last = tried[-1]
    return last[2] * budget / last[3]


class Pruner(nn.Module):
    """The masked training graph, its masks, and the hard network they select.

    ``eval()``: ``pruner(x)`` runs the hard network, exactly what :meth:`export`
    emits. ``train()``: ``soft, hard = pruner(x)``, both branches over the same
    weights. Both read the widths from the masks, the only place they are kept.
    One S2H step of a user's loop::

        soft, hard = pruner(x)
        losses = pruner.losses((soft, hard), y)
        if pruner.backward(losses):   # False: a non-finite step, nothing to apply
            opt.step()
        pruner.mask_step()
    """

    def __init__(
        self, gm: fx.GraphModule, grouping: GroupingResult, flops: FlopsModel,
        config: PruneConfig, s2h: S2HConfig, cost: CostModel | None = None,
    ) -> None:
        super().__init__()
        self.graph_module = gm
        self.grouping = grouping
        self.flops_model = flops
        # what the budget counts (FLOPs, parameters or latency): the resource loss,
        # the one-shot widths, project() and export() use it
        self.cost_model: CostModel = flops if cost is None else cost
        self.config = config
        self.s2h = s2h
        self._masks: dict[int, ChannelMask] = {
            g.index: gm.get_submodule(mask_name(g.index))  # type: ignore[misc]
            for g in grouping.prunable}
        for mask in self._masks.values():
            mask.temperature = s2h.temperature
        self.state = WidthState(gm, grouping, self._masks)
        self.importance = Importance(grouping)
        self.mask_optimizer = MaskOptimizer.from_config(list(self._masks.values()), s2h)
        # the hard network's own BatchNorm statistics (it sees other activations than
        # the soft network), full width; the hard branch updates its kept channels
        self.hard_stats = HardStats(self.graph_module)
        self._mask_grads: dict[str, list[torch.Tensor]] | None = None
        self._step_snapshot: BufferSnapshot | None = None
        self.skipped_steps = 0
        self._target: float | None = None
        self._loaded: dict[str, Any] | None = None
        # (measure, input) of a latency budget's runtime where prune_graph landed it:
        # recalibrate_latency times the hard network with them
        self.latency_probe: tuple[Any, torch.Tensor] | None = None
        scores = self.update_importance()
        values = {g: s.cpu().numpy() for g, s in scores.items()}
        widths = choose_widths(self.cost_model, grouping, values, config.budget,
                               what=COST_NAMES[config.kind], rule=config.one_shot)
        self.set_widths(widths)
        if config.kind != "latency":  # (a latency budget's landing searches one path)
            # the last step of a wide group can land far below the budget: give back
            # what still fits, as project() does after training
            ranks = {g: m.rank.cpu().numpy() for g, m in self._masks.items()}
            grown = grow_widths(self.cost_model, grouping, values, ranks, config.budget,
                                start=widths, rule=config.one_shot)
            if grown != widths:
                self.set_widths(grown)

    def land_latency_budget(self, measure: Any, x: torch.Tensor,
                            rounds: int = 2) -> list[tuple[float, float]]:
        """Time the hard network against the dense one on the latency budget's runtime
        (``measure``, on ``x``) and, where the measured latency ratio is more than
        ``LANDING_TOLERANCE`` below the budget or above it by more than ``export``'s
        tolerance (``S2HConfig.tolerance``), choose the one-shot widths again for
        another target, at most ``rounds`` times.

        The chooser drops channels in one order whatever the target (the model's
        calibration scales every saving alike), so this is a search along one path:
        the next target is the last prediction scaled by budget / measured, or, once
        timed networks lie on both sides of the budget, interpolated between the
        nearest two; a target that gives back a network already timed steps along the
        path to the next untimed one (never past one timed on the far side). The widths
        kept are those whose measured ratio is nearest the budget without exceeding it
        by more than ``export``'s tolerance (a network kept above it would be projected
        away by ``export``), and the model is calibrated through them and the dense
        network (:func:`s2h_fx.latency.refit`): the resource loss and ``export`` then
        count what was measured. Where no network timed fits, the widths are chosen
        once more (not timed) with the model calibrated through the fastest one.
        Raises :class:`BudgetError` where the budget is out of reach as measured: the
        smallest network the groups allow measures above it, every timing is at or
        above the dense latency, or the model calibrated through the fastest allows
        no network within it (per-call overheads, frozen layers); the widths are then
        those from before, as they are when ``measure`` raises. Returns ``(predicted,
        measured)`` per timing (also kept in ``cost_model.landings``)."""
        from s2h_fx import latency

        model = self.cost_model
        if not isinstance(model, latency.LatencyModel):
            raise InputError("land_latency_budget is for a latency budget's model")
        budget, below, above = self.config.budget, LANDING_TOLERANCE, self.s2h.tolerance
        prunable = self.grouping.prunable
        full = {g.index: g.size for g in prunable}
        if self.widths == full:  # the dense network itself: nothing to land
            return []
        dense = self._dense_network()
        smallest = {g.index: g.divisor for g in prunable}
        floor = float(model.ratio(smallest))
        scores = self._scores()
        what = COST_NAMES[self.config.kind]

        def path(target: float) -> dict[int, int]:  # the chooser's network for a target
            return (smallest if target <= floor else
                    choose_widths(model, self.grouping, scores, min(target, 1.0), what=what,
                                  rule=self.config.one_shot))

        start = self.widths
        tried: list[tuple[float, dict[int, int], float, float]] = []  # target, widths, ...
        target, widths = budget, start
        try:  # any way out but the end: the widths as before (the model is not changed)
            for attempt in range(rounds + 1):
                self.set_widths(widths)
                predicted, measured = self._time_hard(measure, x, dense)
                tried.append((target, widths, predicted, measured))
                log.info("latency budget %.3f: widths chosen for %.3f, predicted at %.3f of "
                         "the dense latency, measured at %.3f", budget, target, predicted,
                         measured)
                if widths == smallest and measured > budget + above:
                    raise BudgetError(
                        f"latency budget {budget:g} is out of reach as measured: the "
                        f"smallest network the groups allow (predicted at {predicted:.3f} of "
                        f"the dense latency) measured {measured:.3f} of it on the runtime. "
                        f"Raise the budget or freeze fewer channels{_UNMEASURED}")
                if budget - below <= measured <= budget + above or attempt == rounds:
                    break
                target = max(_next_target(tried, budget), floor)
                widths = path(target)
                if any(widths == t[1] for t in tried):  # step along the path past it,
                    up, gap = measured < budget, 1e-3  # not past a network timed beyond
                    far = [t[2] for t in tried if (t[3] > budget if up else t[3] < budget)]
                    bound = (min(far) if up else max(far)) if far else (1.0 if up else floor)
                    while any(widths == t[1] for t in tried) and gap < 1:
                        target = predicted + gap if up else predicted - gap
                        if (target >= bound) if up else (target <= bound):
                            break
                        widths, gap = path(target), gap * 2
                    if any(widths == t[1] for t in tried):
                        break  # no untimed network between
            fits = [t for t in tried if t[3] <= budget + above]
            _, widths, _, measured = (min(fits, key=lambda t: abs(t[3] - budget)) if fits
                                      else min(tried, key=lambda t: t[3]))
            refitted = latency.refit(model, widths, measured)
            if not fits:  # calibrated through the fastest timed: its choice, not timed
                out_of_reach = (f"latency budget {budget:g} is out of reach as measured: the "
                                f"fastest network timed measured {measured:.3f} of the dense "
                                f"latency")
                if refitted is model:  # no rising line: nothing says a smaller one is faster
                    raise BudgetError(out_of_reach + _UNMEASURED)
                try:
                    widths = choose_widths(refitted, self.grouping, scores, budget, what=what,
                                           rule=self.config.one_shot)
                except BudgetError as exc:
                    raise BudgetError(f"{out_of_reach}, and with the latency model calibrated "
                                      f"through it, {exc}{_UNMEASURED}") from exc
                log.warning("latency budget %.3f: no network timed fits it (the fastest "
                            "measured %.3f of the dense latency); widths chosen again with "
                            "the model calibrated through that one, not timed", budget,
                            measured)
        except BaseException:
            self.set_widths(start)
            raise
        landings = tuple((p, m) for _, _, p, m in tried)
        self.cost_model = dataclasses.replace(refitted, landings=landings)
        self.set_widths(widths)
        return list(landings)

    def _time_hard(self, measure: Any, x: torch.Tensor, dense: nn.Module) -> tuple[float, float]:
        """(predicted, measured) latency ratio of the hard network to ``dense``."""
        from s2h_fx import latency

        network = emit_pruned(self.graph_module, self.plan).eval()
        return (float(self.cost_model.ratio(self.widths)),
                latency.measured_ratio(measure, network, dense, x))

    def _dense_network(self) -> fx.GraphModule:
        from s2h_fx import latency

        full = {g.index: g.size for g in self.grouping.prunable}
        return emit_pruned(self.graph_module, plan_surgery(
            self.graph_module, self.grouping, latency.first_atoms(self.grouping, full))).eval()

    def recalibrate_latency(self, near: float = RECALIBRATE_NEAR) -> float | None:
        """Time the hard network against the dense one on the latency budget's runtime
        and calibrate the latency model again through it (:func:`s2h_fx.latency.refit`),
        where its predicted ratio is within ``near`` of the budget (a line through a
        network far from the budget predicts less well at it). S2H training moves the
        widths away from the network landing timed; ``fit`` calls this after each
        search epoch so that the resource loss, ``project()`` before the settling
        epochs and ``export`` count what the trained network measures. Returns the
        measured ratio, or None where nothing was timed (no latency budget landed by
        ``prune_graph``, or the network far from the budget)."""
        from s2h_fx import latency

        model = self.cost_model
        if self.latency_probe is None or not isinstance(model, latency.LatencyModel):
            return None
        widths = self.widths
        predicted = float(model.ratio(widths))
        if abs(predicted - self.config.budget) > near:
            return None
        measure, x = self.latency_probe
        _, measured = self._time_hard(measure, x, self._dense_network())
        self.cost_model = dataclasses.replace(
            latency.refit(model, widths, measured),
            landings=model.landings + ((predicted, measured),))
        log.info("latency budget %.3f: the hard network, predicted at %.3f of the dense "
                 "latency, measured at %.3f; the model is calibrated through it",
                 self.config.budget, predicted, measured)
        return measured

    def _scores(self) -> dict[int, np.ndarray]:
        return {g: s.cpu().numpy() for g, s in self.importance.scores(self.graph_module).items()}

    # ---- inspection ------------------------------------------------------
    @property
    def groups(self) -> _GroupTable:
        return _GroupTable(self.grouping, self.widths)

    @property
    def widths(self) -> dict[int, int]:
        """Hard width of every prunable group, as the masks give it now."""
        return self.state.widths()

    @property
    def plan(self) -> SurgeryPlan:
        """The surgery plan of the masks' sub-network."""
        return self.state.plan()

    def masks(self) -> dict[int, ChannelMask]:
        """The ChannelMask of each prunable group, by group index."""
        return dict(self._masks)

    def mask_parameters(self) -> list[nn.Parameter]:
        """The mask logits u, apart from the model's weights."""
        return [m.logits for m in self._masks.values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """The model's weights theta (everything but the mask logits)."""
        ids = {id(p) for p in self.mask_parameters()}
        return [p for p in self.graph_module.parameters() if id(p) not in ids]

    def flops(self, widths: dict[int, Any] | None = None) -> Any:
        """FLOPs of the hard network at ``widths`` (default: the current widths)."""
        return self.flops_model(self.widths if widths is None else widths)

    def flops_ratio(self, widths: dict[int, Any] | None = None) -> Any:
        return self.flops(widths) / self.flops_model.total

    def cost_ratio(self, widths: dict[int, Any] | None = None) -> Any:
        """The budget's cost (FLOPs, parameters or latency: ``config.kind``) of the hard
        network at ``widths`` (default: the current widths), over the full network's."""
        return self.cost_model.ratio(self.widths if widths is None else widths)

    # ---- widths ----------------------------------------------------------
    def update_importance(self) -> dict[int, torch.Tensor]:
        """Recompute the L1 importance of every class and re-rank each mask's classes."""
        scores = self.importance.scores(self.graph_module)
        for g, rank in self.importance.ranks(scores).items():
            self._masks[g].rank.copy_(rank)
        return scores

    def set_widths(self, widths: dict[int, int], keep: dict[int, np.ndarray] | None = None) -> None:
        """Choose each group's width (and optionally which classes it keeps); groups
        left out go to full width.

        The masks are set to these widths with full confidence (and their ranks
        put the kept classes first): the masks are where widths live.
        """
        full = {g.index: g.size for g in self.grouping.prunable}
        unknown = set(widths) - set(full)
        if unknown:
            raise ValueError(f"groups {sorted(unknown)} are not prunable groups")
        merged = {**full, **{g: int(w) for g, w in widths.items()}}
        for g, w in merged.items():
            grp = self.grouping.groups[g]
            if not grp.divisor <= w <= grp.size or w % grp.divisor:
                raise ValueError(
                    f"group {g}: width {w} is not a multiple of {grp.divisor} in "
                    f"[{grp.divisor}, {grp.size}]"
                )
        ranks = {g: m.rank for g, m in self._masks.items()}
        chosen = keep_from_ranks(ranks, merged) if keep is None else keep
        for g, w in merged.items():
            if len(chosen[g]) != w:
                raise ValueError(f"group {g}: keep has {len(chosen[g])} classes for width {w}")
            self._masks[g].set_width(w)
            self._masks[g].rank.copy_(rank_with_first(chosen[g], self._masks[g].rank))
        got = self.state.selection()
        if got.widths != merged:
            raise InvariantError(f"masks give widths {got.widths}, asked for {merged}")

    def reset_masks(self) -> None:
        """Put every mask at full width (its learnable starting point) and re-rank
        the channels by importance: where S2H training starts."""
        for m in self._masks.values():
            m.reset_full_width()
        self.update_importance()

    def mask_widths(self) -> dict[int, int]:
        """Hard widths n of the masks now (the same as :attr:`widths`)."""
        return self.state.widths()

    def sync_from_masks(self) -> None:
        """Kept for older loops: the hard network always is the masks' sub-network
        (this only makes sure the structure of the current widths is built)."""
        self.state.skeleton(self.state.structure())

    # ---- running ---------------------------------------------------------
    def soft_forward(self, *args: Any) -> Any:
        """The full-width network with every channel scaled by its relaxed mask value."""
        return self.graph_module(*args)

    @contextlib.contextmanager
    def _fixed_masks(self) -> Iterator[None]:
        keep = self.plan.keep
        masks = self._masks
        for g, m in masks.items():
            values = torch.zeros(m.size, device=m.fixed.device)
            values[torch.as_tensor(keep[g], device=m.fixed.device)] = 1.0
            m.fixed.copy_(values)
            m.use_fixed = True
        try:
            yield
        finally:
            for m in masks.values():
                m.use_fixed = False

    def masked_forward(self, *args: Any) -> Any:
        """The full-width network with the hard network's dropped channels zeroed.

        A test oracle: in training mode it uses batch statistics but leaves every
        running statistic as it found it."""
        snapshot = BufferSnapshot(running_stat_buffers(self.graph_module))
        try:
            with self._fixed_masks():
                return self.graph_module(*args)
        finally:
            snapshot.restore()

    def hard_forward(self, *args: Any) -> Any:
        """The sub-network at the current widths: weights sliced, only kept channels computed.

        Gradients reach the weights through the slicing; none reach the masks. The
        skeleton is that of the current widths (emitted once per widths tuple); the
        kept channels' positions are index tensors computed on the device from the
        rank buffers: no host read once the widths are known (see
        :mod:`s2h_fx.state`).
        """
        state = self.state
        structure = state.structure()
        return run_hard(self.graph_module, state.skeleton(structure), state.cuts(structure),
                        self.hard_stats, self.training, args)

    def forward(self, *args: Any) -> Any:
        if self.training:
            self.snapshot_statistics()
            return self.soft_forward(*args), self.hard_forward(*args)
        return self.hard_forward(*args)

    # ---- S2H training steps ------------------------------------------------
    @property
    def target_ratio(self) -> float:
        """The cost ratio (the budget's kind: FLOPs, parameters or latency) the resource
        loss and the mask step aim at: the budget, unless :meth:`set_target_ratio` set
        a way-point above it (a gradual descent)."""
        return self.config.budget if self._target is None else self._target

    def set_target_ratio(self, ratio: float | None) -> None:
        """Aim training at ``ratio`` in [budget, 1] for now (None: the budget).
        :meth:`project` and :meth:`export` always hold the budget itself."""
        if ratio is not None and not self.config.budget <= ratio <= 1:
            raise ValueError(f"a target ratio must lie in [budget {self.config.budget:g}, 1], "
                             f"got {ratio!r}")
        self._target = None if ratio is None else float(ratio)

    def resource_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda_R (F(n)/F - target)^2, F(n)/F) with straight-through hard widths n;
        the target is the budget (see :attr:`target_ratio`). F is the budget's cost
        (:attr:`cost_model`: FLOPs, parameters or latency)."""
        widths = {g: m.hard_width() for g, m in self._masks.items()}
        ratio = self.cost_model.ratio(widths)
        return self.s2h.resource_weight * (ratio - self.target_ratio) ** 2, ratio

    def losses(
        self, outputs: tuple[torch.Tensor, torch.Tensor], target: Any,
        task_loss: Any = F.cross_entropy, *, decoupled: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The four S2H terms, coefficients included: "task" L = task_loss(soft, target),
        "resource" R, "kd_hard" G_h = KL(sg(soft) || hard), "kd_soft" G_s = KL(sg(hard) || soft).

        ``decoupled=False`` (an ablation) drops the stop-gradients: both KL terms then
        reach everything, as with a plain ``sum(losses.values()).backward()``."""
        soft, hard = outputs
        resource, _ = self.resource_loss()
        return s2h_losses(soft, hard, target, resource, self.s2h.kd_weight, task_loss, decoupled)

    def backward(
        self, losses: dict[str, torch.Tensor], grad_scaler: Any = None, *, decoupled: bool = True
    ) -> bool:
        """Decoupled backward: theta.grad += d(L + G_h)/dtheta; u.grad += d(L + G_s + R)/du.

        G_s never reaches the weights and G_h never reaches the masks. With a
        ``torch.amp.GradScaler`` the weight gradients are scaled as usual.
        Under ``torch.distributed`` (e.g. the pruner wrapped in
        ``DistributedDataParallel`` under torchrun) the mask logits' task and
        distillation gradient is averaged over the ranks here, since the G_s pass
        runs outside DDP's reducer; R is the same on every rank.

        Returns False, and leaves the step with nothing to apply, when a loss or a
        gradient is not finite (on any rank): every weight's ``.grad`` is set to
        None (so ``opt.step()`` changes neither weights nor optimiser state), the
        gradients gathered for the mask step since the last one are dropped, and
        the BatchNorm statistics the forward updated are put back. The step is
        counted in :attr:`skipped_steps` and logged.
        ``decoupled=False`` (an ablation): every term reaches everything.
        """
        split = decoupled_backward(losses, self.weight_parameters(), self.mask_parameters(),
                                   grad_scaler, decoupled)
        if split is None:
            self.skipped_steps += 1
            self.discard_step()
            log.warning("non-finite loss or gradient: step skipped (%d so far)",
                        self.skipped_steps)
            return False
        self._step_snapshot = None
        task, resource = split
        if self._mask_grads is None:
            self._mask_grads = {"task": task, "resource": resource}
        else:  # gradient accumulation
            acc = self._mask_grads
            acc["task"] = [a + t for a, t in zip(acc["task"], task)]
            acc["resource"] = [a + r for a, r in zip(acc["resource"], resource)]
        return True

    def mask_step(self) -> None:
        """One step of the mask optimiser on the gradients gathered by :meth:`backward`,
        then re-rank channels by importance (unless ``fix_importance``)."""
        if self._mask_grads is not None:
            gap = float(self.cost_ratio()) - self.target_ratio
            self.mask_optimizer.step(self._mask_grads["task"], self._mask_grads["resource"], gap)
        self.drop_mask_grads()
        if not self.s2h.fix_importance:
            self.update_importance()

    def snapshot_statistics(self) -> None:
        """Keep a copy of every BatchNorm running statistic (soft and hard network) for
        :meth:`discard_step`; a train-mode forward takes one itself."""
        self._step_snapshot = BufferSnapshot(
            running_stat_buffers(self.graph_module, self.hard_stats))

    def discard_step(self) -> None:
        """Forget a step that will not be applied: the weights' and masks' gradients
        are dropped and the running statistics its forward updated are put back."""
        for p in self.weight_parameters():
            p.grad = None
        self.drop_mask_grads()
        if self._step_snapshot is not None:
            self._step_snapshot.restore()

    def drop_mask_grads(self) -> None:
        """Forget the mask gradients gathered since the last mask step (no step taken)."""
        self._mask_grads = None
        for p in self.mask_parameters():
            p.grad = None

    def fit(self, train_loader: Iterable[Any], epochs: int = 30, **kwargs: Any) -> Any:
        """S2H training with defaults; see :func:`s2h_fx.trainer.fit` for the options."""
        from s2h_fx.trainer import fit

        return fit(self, train_loader, epochs, **kwargs)

    # ---- finishing ---------------------------------------------------------
    def recalibrate_bn(self, batches: Iterable[Any], num_batches: int = 20) -> int:
        """Re-estimate the hard network's BatchNorm statistics on training batches
        (training uses batch statistics); returns the number of batches used."""
        return recalibrate(self.graph_module, self.plan, self.hard_stats, batches, num_batches)

    def project(self, floor_margin: float = 0.03) -> bool:
        """Bring the hard network's FLOPs ratio into [budget - floor_margin, budget +
        tolerance]: above it, shrink by the steps worth least per unit of cost saved;
        then (and when far below it) give back the steps worth most per unit of cost
        while the cost stays within the budget (the one-shot rule,
        ``PruneConfig.one_shot``). Returns whether it changed."""
        ratio = float(self.cost_ratio())
        budget, tol = self.config.budget, self.s2h.tolerance
        if budget - floor_margin <= ratio <= budget + tol:
            return False
        scores = self._scores()
        ranks = {g: m.rank.cpu().numpy() for g, m in self._masks.items()}
        widths = self.widths
        if ratio > budget + tol:
            widths = choose_widths(self.cost_model, self.grouping, scores, budget,
                                   start=widths, what=COST_NAMES[self.config.kind],
                                   rule=self.config.one_shot)
        # one divisor step of a wide group can overshoot far below the budget: give
        # back what still fits (below the budget: the whole way up to it)
        widths = grow_widths(self.cost_model, self.grouping, scores, ranks, budget,
                             start=widths, rule=self.config.one_shot)
        what = COST_NAMES[self.config.kind]
        if widths == self.widths:  # below the band, and nothing more fits the budget
            log.info("hard network at %.4f of the %s, budget %.4f: no width can grow "
                     "within the budget", ratio, what, budget)
            return False
        self.set_widths(widths)
        after = float(self.cost_ratio())
        log.warning("hard network at %.4f of the %s, budget %.4f: projected to %.4f%s",
                    ratio, what, budget, after,
                    "" if budget - floor_margin <= after <= budget + tol else
                    " (the groups' widths cannot land inside the band)")
        return True

    @_GcPaused()
    def export(self, enforce_budget: bool = True) -> fx.GraphModule:
        """The physically pruned network (a fresh GraphModule, in eval mode): the hard
        network of the masks.

        Never above ``budget + tolerance`` unless ``enforce_budget=False``: a hard
        network above it is first projected onto the budget (the pruner's widths
        change, with a warning saying so); if no widths fit, BudgetError. Raises
        NonFiniteError if a weight or statistic of the network is not finite.
        """
        limit = self.config.budget + self.s2h.tolerance
        ratio = float(self.cost_ratio())
        if enforce_budget and ratio > limit:
            self._check_finite(emit_pruned(self.graph_module, self.plan,
                                           overrides=self.hard_stats.tensors()))
            log.warning("export: the hard network is at %.4f of the %s, above the budget "
                        "%.4f + %.4f; projecting it onto the budget (export(enforce_budget="
                        "False) keeps it as it is)", ratio, COST_NAMES[self.config.kind],
                        self.config.budget, self.s2h.tolerance)
            self.project()
            if float(self.cost_ratio()) > limit:
                raise BudgetError(f"no widths of this network meet budget "
                                  f"{self.config.budget:g}: projection ends at "
                                  f"{float(self.cost_ratio()):.4f}")
        pruned = emit_pruned(self.graph_module, self.plan, overrides=self.hard_stats.tensors())
        if any(n.startswith("s2h_mask") for n, _ in pruned.named_modules()):
            raise InvariantError("mask modules left in the emitted graph")
        self._check_finite(pruned)
        return pruned.eval()

    @staticmethod
    def _check_finite(module: nn.Module) -> None:
        """Parameters and running statistics (what training writes) must be finite;
        other buffers are constants of the model (an additive attention mask holds
        -inf on purpose), so only NaN is wrong there."""
        stats = {id(t) for t in running_stat_buffers(module)}
        stats |= {id(t) for m in module.modules() if isinstance(m, _NormBase)
                  for t in (m.running_mean, m.running_var) if t is not None}
        # a tensor's sum is finite when all its values are (one reduction, not a mask);
        # a finite tensor whose sum overflows gets the exact test
        trained = [(n, t) for n, t in module.named_buffers() if id(t) in stats]
        bad = [n for n, t in list(module.named_parameters()) + trained
               if t.is_floating_point() and not bool(torch.isfinite(t.detach().sum()))
               and not bool(torch.isfinite(t).all())]
        bad += [n for n, t in module.named_buffers()
                if id(t) not in stats and t.is_floating_point() and bool(torch.isnan(t).any())]
        if bad:
            raise NonFiniteError(
                f"the pruned network has non-finite values in {len(bad)} tensors "
                f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); it was trained "
                "on non-finite data or diverged: lower the learning rate or check the data")

    # ---- state -------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        sel = self.state.selection()
        out = {"mask_optimizer": self.mask_optimizer.state_dict(),
               "skipped_steps": self.skipped_steps,
               "widths": sel.widths,
               "keep": {g: k.tolist() for g, k in sel.keep.items()}}
        m: Any = self.cost_model
        if hasattr(m, "landings"):  # a latency model's calibration
            out["latency_calibration"] = {"constant": m.constant, "scale": m.scale,
                                          "landings": [list(t) for t in m.landings]}
        return out

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.mask_optimizer.load_state_dict(state["mask_optimizer"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        saved, model = state.get("latency_calibration"), self.cost_model
        if saved is not None and hasattr(model, "landings"):
            # the calibration training counted (timings of a new build differ): the
            # resource loss and export go on with it
            self.cost_model = dataclasses.replace(
                cast(Any, model), constant=float(saved["constant"]),
                scale=float(saved["scale"]),
                landings=tuple(tuple(t) for t in saved["landings"]))
        self._loaded = state  # checked against the loaded masks by load_state_dict

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As nn.Module's, then checks that the loaded masks give the saved widths."""
        self._loaded = None
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._loaded is not None:
            sel = self.state.selection()
            widths = {int(g): int(w) for g, w in self._loaded["widths"].items()}
            keep = {int(g): np.asarray(k, dtype=np.int64) for g, k in self._loaded["keep"].items()}
            if sel.widths != widths or any(not np.array_equal(sel.keep[g], keep[g]) for g in keep):
                raise InvariantError("the loaded mask logits and ranks do not give the saved "
                                     "widths and kept channels (a state from another model?)")
            self._loaded = None
        return result


class _GroupTable:
    """Printable view of the groups with the current widths."""

    def __init__(self, grouping: GroupingResult, widths: dict[int, int]) -> None:
        self.grouping, self.widths = grouping, widths

    def __iter__(self) -> Any:
        return iter(self.grouping.groups)

    def __len__(self) -> int:
        return len(self.grouping.groups)

    def __getitem__(self, i: int) -> Any:
        return self.grouping.groups[i]

    def __str__(self) -> str:
        return self.grouping.table(self.widths)

    __repr__ = __str__

"""``fit``: S2H training with sensible defaults, built only from the pruner's public
steps (forward, losses, backward, mask_step), so a user's own loop can do the same.

The loop itself (schedule, non-finite guard, checkpoints, resume) is
:mod:`s2h_fx.loop`; this module says what one step of each kind of training does:
S2H and its ablations (:data:`METHODS`), the full-width warm-up, and plain dense
training (:func:`fit_dense`, the demo's baseline).

Host reads per step (each one stalls a GPU until its work is done). A search
step: one batched read of the widths (after the mask step; the next forward uses
them, and the FLOPs ratio a step reports is computed from them on the host), the
decoupled backward's non-finite check, and the loop's one read of the losses and
correct counts (the non-finite guard needs them on the host; the per-step metrics
come with that read, so they cost no read of their own and ``EpochRecord``
reports what it did before). A settling step (architecture fixed): no width read
(the widths are cached by the logits' version counters), no re-planning; the
pruner's part of the step (hard branch, losses, backward) reads nothing; the
loop's guard still reads once (and once more for the gradients of the hard
network alone, checked on the host when no GradScaler is used).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from s2h_fx.checkpoint import CheckpointStore
from s2h_fx.copying import BufferSnapshot
from s2h_fx.dist import broadcast_buffers, world_size
from s2h_fx.errors import CheckpointError
from s2h_fx.hard import running_stat_buffers
from s2h_fx.loop import (
    Loop,
    LoopSettings,
    Metrics,
    epoch_accuracy,
    epoch_means,
    split_batch,
)
from s2h_fx.schedule import CosineSchedule, cosine_factor

if TYPE_CHECKING:
    from s2h_fx.pruner import Pruner

log = logging.getLogger(__name__)

# s2h: the decoupled S2H step. no_decouple: S2H with every term reaching everything.
# hard_st: only the masked network with straight-through binary masks, CE + R.
# soft_only: only the relaxed-mask network, CE + R. (benchmarks/gap.py compares them.)
METHODS = ("s2h", "no_decouple", "hard_st", "soft_only")
S2H_TERMS = ("task", "resource", "kd_hard", "kd_soft")


@dataclass
class EpochRecord:
    epoch: int
    losses: dict[str, float]
    flops_ratio: float
    soft_acc: float  # on the training batches of this epoch
    hard_acc: float
    val_soft_acc: float | None = None
    val_hard_acc: float | None = None
    steps: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    settling: bool = False  # an epoch with the architecture fixed (S2HConfig.settle_epochs)

    @property
    def val_gap(self) -> float | None:
        if self.val_soft_acc is None or self.val_hard_acc is None:
            return None
        return self.val_soft_acc - self.val_hard_acc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochRecord:
        return cls(**d)


@torch.no_grad()
def evaluate(pruner: Pruner, loader: Iterable[Any], device: torch.device) -> tuple[float, float]:
    """(soft accuracy, hard accuracy) in eval mode."""
    was = pruner.training
    pruner.eval()
    soft_ok = hard_ok = total = 0
    for batch in loader:
        x, y = split_batch(batch, device)
        soft_ok += int((pruner.soft_forward(x).argmax(-1) == y).sum())
        hard_ok += int((pruner(x).argmax(-1) == y).sum())
        total += y.numel()
    pruner.train(was)
    return soft_ok / max(total, 1), hard_ok / max(total, 1)


# ---- the kinds of step ----------------------------------------------------------------
class _S2HStep:
    """One S2H step (or an ablation of it): forward, losses, decoupled backward;
    after the weights' step, the mask step (with ``schedule``: its step size scaled
    by the weights' schedule factor). ``settle``: the architecture is fixed, no mask
    step; the mask gradients the backward gathered are dropped."""

    def __init__(self, pruner: Pruner, method: str, schedule: CosineSchedule | None = None,
                 settle: bool = False, target: Callable[[], float | None] | None = None) -> None:
        self.pruner, self.method = pruner, method
        self.decoupled = method != "no_decouple"
        self.schedule, self.settle = schedule, settle
        self.target = target

    def begin(self) -> None:
        self.pruner.train()
        for m in self.pruner.masks().values():
            m.straight_through = self.method == "hard_st"

    def end(self) -> None:
        for m in self.pruner.masks().values():
            m.straight_through = False

    def forward(self, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        p = self.pruner
        if self.target is not None:
            p.set_target_ratio(self.target())
        if self.method in ("s2h", "no_decouple"):
            soft, hard = p(x)
            return p.losses((soft, hard), y, decoupled=self.decoupled), {"soft": soft, "hard": hard}
        # hard_st: the masked graph with straight-through masks (the binary-mask
        # emulation of the hard network); soft_only: the relaxed-mask network
        p.snapshot_statistics()  # these forwards bypass pruner(x), which takes it
        out = p.graph_module(x) if self.method == "hard_st" else p.soft_forward(x)
        ce = F.cross_entropy(out, y)
        # zeros in the distillation slots; kd_soft has its own cheap graph to the logits
        # (a second resource_loss()), so that backward's separate G_s pass neither runs
        # through the whole network nor frees the resource term's graph
        losses = {"task": ce, "resource": p.resource_loss()[0], "kd_hard": 0.0 * ce,
                  "kd_soft": 0.0 * p.resource_loss()[0]}
        return losses, {"soft": out, "hard": out}

    def backward(self, losses: dict[str, torch.Tensor], scaler: Any) -> bool | None:
        # Pruner.backward returns False for a non-finite loss or gradient, with the
        # gathered mask gradients already dropped
        backward: Callable[..., bool | None] = self.pruner.backward
        return backward(losses, grad_scaler=scaler, decoupled=self.decoupled)

    def after(self) -> Metrics:
        p = self.pruner
        if self.settle:
            p.drop_mask_grads()  # no mask step (nor re-ranking)
        else:
            if self.schedule is not None:  # called after the weights' step, before the
                p.mask_optimizer.lr_scale = self.schedule.factor()  # schedule's
            p.mask_step()
        flops = float(p.flops_ratio())
        cost = flops if p.cost_model is p.flops_model else float(p.cost_ratio())
        return {"flops": flops, "cost": cost, "target": p.target_ratio}

    def discard(self) -> None:
        self.pruner.discard_step()

    def params(self) -> list[nn.Parameter]:
        return self.pruner.weight_parameters() + self.pruner.mask_parameters()


class _HardStep:
    """A settling step that trains the hard network alone on the task loss (the
    architecture fixed, no soft branch): ``S2HConfig.settle_mode == "hard"``."""

    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner

    def begin(self) -> None:
        self.pruner.train()

    def end(self) -> None:
        pass

    def forward(self, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        p = self.pruner
        p.snapshot_statistics()
        out = p.hard_forward(x)
        return {"task": F.cross_entropy(out, y)}, {"hard": out}

    def backward(self, losses: dict[str, torch.Tensor], scaler: Any) -> bool | None:
        loss = losses["task"]
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return None  # the loop checks the gradients

    def after(self) -> Metrics:
        self.pruner.drop_mask_grads()
        return {"flops": float(self.pruner.flops_ratio())}

    def discard(self) -> None:
        self.pruner.discard_step()

    def params(self) -> list[nn.Parameter]:
        return self.pruner.weight_parameters()


class _PlainStep:
    """Cross-entropy training of one network: the dense baseline, or the pruner's
    full-width network with every mask held at 1 (the warm-up)."""

    def __init__(self, model: nn.Module, masks: list[Any] | None = None) -> None:
        self.model, self.masks = model, masks or []

    def begin(self) -> None:
        self.model.train()
        for m in self.masks:
            m.fixed.fill_(1.0)
            m.use_fixed = True

    def end(self) -> None:
        for m in self.masks:
            m.use_fixed = False

    def forward(self, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        self.snapshot = BufferSnapshot(running_stat_buffers(self.model))
        out = self.model(x)
        return {"loss": F.cross_entropy(out, y)}, {"train": out}

    def backward(self, losses: dict[str, torch.Tensor], scaler: Any) -> bool | None:
        loss = losses["loss"]
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return None

    def after(self) -> Metrics:
        return {}

    def discard(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        self.snapshot.restore()  # a NaN forward poisons BatchNorm statistics

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


# ---- fit ------------------------------------------------------------------------------
def fit(
    pruner: Pruner,
    train_loader: Iterable[Any],
    epochs: int = 30,
    *,
    val_loader: Iterable[Any] | None = None,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    warmup_epochs: int = 0,
    device: str | torch.device | None = None,
    amp: bool = False,
    bn_batches: int = 20,
    progress: bool = True,
    on_step: Callable[[dict[str, float]], None] | None = None,
    steps_per_epoch: int | None = None,
    max_nonfinite: int | None = 5,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = False,
    method: str = "s2h",
    finish: bool = True,
    keep_heap: bool = True,
) -> list[EpochRecord]:
    """Train the soft and hard branches with S2H; leave the pruner in eval mode at the
    trained hard network (BatchNorm re-estimated, projected onto the budget if above).

    Weights: SGD with momentum (``nesterov`` optional) and a cosine schedule (:mod:`s2h_fx.schedule`; for a
    loader without ``__len__`` give ``steps_per_epoch`` or the first epoch runs at
    the base rate while its length is measured). Masks: the built-in mask
    optimiser, starting from full width. ``warmup_epochs`` of plain training of
    the full network come first. ``amp`` uses ``torch.autocast`` (bfloat16 on CPU).

    Non-finite losses or gradients: the step is skipped and counted
    (``EpochRecord.skipped``); after ``max_nonfinite`` in a row,
    :class:`~s2h_fx.errors.NonFiniteError` (None: never).

    ``checkpoint``: a directory (or ``NAME.pt``) for atomic checkpoints at the end of
    every epoch and every ``checkpoint_every`` batches, the newest
    ``keep_checkpoints`` kept. ``resume=True`` continues from the newest readable
    one exactly where it stopped (same data order, same random draws), or starts
    afresh when there is none; without ``resume`` the location must hold none.

    ``method``: ``"s2h"`` or an ablation from :data:`METHODS`. ``finish=False`` leaves
    the masks as training left them (no projection, no BatchNorm re-estimation;
    :func:`finish` does those).

    ``keep_heap`` (CPU only, glibc): freed memory stays in the process while an
    epoch runs instead of going back to the kernel and faulting in again next step
    (:mod:`s2h_fx.heap`; without it glibc usually settles there by itself after
    some steps, and not always).

    The pruner's :class:`~s2h_fx.config.S2HConfig` sets the mask optimiser's
    momentum, whether its step size follows the weights' schedule
    (``mask_lr_follows_schedule``), the descent of the target (``descent_epochs``)
    and ``settle_epochs``: the last that many of the ``epochs`` run with the
    architecture projected into the budget band and fixed (no mask step; by default
    the hard network trains alone, ``settle_mode``), decided by the loop's epoch
    counter, so a resume continues in the right phase.

    Under ``torch.distributed`` (torchrun; give each rank its shard of the data,
    e.g. with a ``DistributedSampler``) the weights' gradients are averaged over
    the ranks every step (the mask logits' by :meth:`Pruner.backward`), all ranks
    skip the same non-finite steps, only rank 0 shows progress bars and writes
    checkpoints, and at the end every rank gets rank 0's buffers.
    """
    if epochs < 0 or warmup_epochs < 0:
        raise ValueError("epochs and warmup_epochs must be >= 0")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=DIR (where the checkpoints are)")
    descent_epochs, settle = pruner.s2h.phases(epochs)
    if settle and settle >= epochs:
        raise ValueError(f"S2HConfig.settle_epochs={settle} must be smaller than epochs="
                         f"{epochs} (the architecture is learnt in the epochs before)")
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    pruner.to(dev)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay, nesterov=nesterov)
    if world_size() > 1:
        progress = progress and torch.distributed.get_rank() == 0
    settings = LoopSettings(epochs + warmup_epochs, steps_per_epoch, max_nonfinite,
                            checkpoint_every, amp, progress, keep_heap)
    store = CheckpointStore(checkpoint, keep_checkpoints) if checkpoint is not None else None
    meta: dict[str, Any] = {"kind": "fit", "epochs": epochs, "warmup_epochs": warmup_epochs,
                            "method": method}
    # what the masks were trained towards: resuming towards another budget, or projecting
    # with another one-shot rule, would mix two runs without saying so (a latency
    # budget's calibration belongs to its runtime, batch, device and threads)
    cfg = pruner.config
    meta.update(budget=cfg.budget, budget_kind=cfg.kind, one_shot=cfg.one_shot)
    if cfg.kind == "latency":
        meta.update(budget_runtime=cfg.runtime, budget_batch=cfg.batch,
                    budget_device=cfg.device, budget_threads=cfg.threads)
    # the phases are part of the run (only where used: checkpoints from before the
    # options, which had neither, still resume into a run without them)
    if settle:
        meta.update(settle_epochs=settle, settle_mode=pruner.s2h.settle_mode)
    if descent_epochs:
        meta["descent_epochs"] = descent_epochs
    if pruner.grouping.attention == "both":  # more masks: a run of another mode cannot resume
        meta["attention"] = "both"
    loop = Loop(pruner, train_loader, opt, dev, settings, store=store, meta=meta,
                on_step=on_step, recorded_later=RECORDED_LATER)
    _start(loop, store, resume)
    warm = _PlainStep(pruner.graph_module, list(pruner.masks().values()))
    schedule = loop.sched if pruner.s2h.mask_lr_follows_schedule else None
    descent = _descent(pruner, descent_epochs, loop.sched, warmup_epochs)
    s2h = _S2HStep(pruner, method, schedule, target=descent)
    settling: _S2HStep | _HardStep = (
        _HardStep(pruner) if pruner.s2h.settle_mode == "hard"
        else _S2HStep(pruner, method, schedule, settle=True))
    try:
        _run_epochs(loop, pruner, (warm, s2h, settling), epochs, warmup_epochs, settle,
                    val_loader, dev)
    finally:  # a way-point of the descent is not left behind, even on an error
        pruner.set_target_ratio(None)
    history = [EpochRecord.from_dict(d) for d in loop.state.history]
    if finish:
        finish_training(pruner, train_loader, bn_batches)
    return history


def _run_epochs(loop: Loop, pruner: Pruner, steps: tuple[Any, Any, Any], epochs: int,
                warmup_epochs: int, settle: int, val_loader: Iterable[Any] | None,
                dev: torch.device) -> None:
    """The epochs of ``fit`` from where the loop stands: warm-up, then S2H (descent and
    search), then settling."""
    warm, s2h, settling = steps
    total = epochs + warmup_epochs
    while loop.state.epoch < total:
        g = loop.state.epoch
        if g < warmup_epochs:
            loop.run_epoch(warm, f"warm-up {g + 1}/{warmup_epochs}")
            loop.end_epoch(None)
            continue
        if g == warmup_epochs and loop.state.step == 0:
            _from_full_width(pruner)
        n = g - warmup_epochs + 1
        if n > epochs - settle:
            if n == epochs - settle + 1 and loop.state.step == 0:
                # the architecture the settling epochs train is the one exported: bring
                # it into the budget band now, not after it has been trained
                pruner.set_target_ratio(None)
                pruner.project()
            sums = loop.run_epoch(settling, f"S2H epoch {n}/{epochs} (settling)", _postfix)
        else:
            sums = loop.run_epoch(s2h, f"S2H epoch {n}/{epochs}", _postfix)
            # a latency budget: the model calibrated through the network trained so
            # far (before the epoch's checkpoint, which saves the calibration)
            pruner.recalibrate_latency()
        record = _record(pruner, sums, n, val_loader, dev)
        record.settling = n > epochs - settle
        loop.end_epoch(record.to_dict())
    if epochs == 0:
        _from_full_width(pruner)


def _descent(pruner: Pruner, epochs: float, sched: CosineSchedule, warmup_epochs: int
             ) -> Callable[[], float | None] | None:
    """``S2HConfig.descent_epochs``: the target cost ratio of each S2H step, from 1 (the full
    network) down to the budget along a half cosine over that many epochs (in the ratio,
    or in its logarithm: ``descent_shape``), then the budget. It reads the optimiser steps the schedule counted, so a resume continues
    the descent where it stopped; while the epoch length is unknown (a loader without
    ``__len__`` and no ``steps_per_epoch``) the target is the budget."""
    if not epochs:
        return None
    budget = pruner.config.budget
    geometric = pruner.s2h.descent_shape == "geometric"

    def target() -> float | None:
        if sched.steps_per_epoch is None:
            return None
        done = sched.steps - warmup_epochs * sched.steps_per_epoch
        length = max(round(epochs * sched.steps_per_epoch), 1)
        f = cosine_factor(done, length)
        if geometric:
            return min(1.0, budget ** (1.0 - f))
        return min(1.0, budget + (1.0 - budget) * f)
    return target


def _from_full_width(pruner: Pruner) -> None:
    """S2H training starts from full width by design (not on a resume mid-run)."""
    pruner.reset_masks()


# what fit's checkpoints record since they began to: a checkpoint from before resumes
# with a warning that these were not checked, instead of a refusal
RECORDED_LATER = frozenset({"budget", "budget_kind", "one_shot", "budget_runtime",
                            "budget_batch", "budget_device", "budget_threads"})


def _start(loop: Loop, store: CheckpointStore | None, resume: bool) -> None:
    if store is None:
        return
    if not resume:
        existing = store.files()
        if existing:
            raise CheckpointError(
                f"{store.directory} already holds checkpoints ({existing[0].name}, ...): "
                "pass resume=True (--resume) to continue that run, or another location")
        return
    found = store.load_latest()
    if found is None:
        log.info("no checkpoint in %s: starting a new run", store.directory)
        return
    ckpt, path = found
    loop.restore(ckpt)
    log.info("resuming from %s: epoch %d, after batch %d of it", path, loop.state.epoch + 1,
             loop.state.step)


def _record(pruner: Pruner, sums: dict[str, Any], n: int, val_loader: Iterable[Any] | None,
            dev: torch.device) -> EpochRecord:
    record = EpochRecord(n, epoch_means(sums, S2H_TERMS),
                         float(pruner.flops_ratio(pruner.mask_widths())),
                         # nan: a settling epoch of the hard network alone has no soft branch
                         epoch_accuracy(sums, "soft") if "soft" in sums["correct"]
                         else float("nan"), epoch_accuracy(sums, "hard"),
                         steps=list(sums["steps"]), skipped=int(sums["skipped"]))
    if val_loader is not None:
        record.val_soft_acc, record.val_hard_acc = evaluate(pruner, val_loader, dev)
        log.info("epoch %d: val soft %.4f hard %.4f gap %.4f, hard FLOPs %.4f", n,
                 record.val_soft_acc, record.val_hard_acc, record.val_gap, record.flops_ratio)
    return record


def _postfix(step: Metrics) -> dict[str, str]:
    if "soft_acc" not in step:  # a settling step of the hard network alone
        return {"L": f"{step['task']:.3f}", "flops": f"{step['flops']:.3f}",
                "acc h": f"{step['hard_acc']:.2f}"}
    return {"L": f"{step['task']:.3f}", "R": f"{step['resource']:.4f}",
            "Gh": f"{step['kd_hard']:.3f}", "Gs": f"{step['kd_soft']:.3f}",
            "flops": f"{step['flops']:.3f}",
            "acc s/h": f"{step['soft_acc']:.2f}/{step['hard_acc']:.2f}"}


def finish_training(pruner: Pruner, train_loader: Iterable[Any], bn_batches: int = 20) -> bool:
    """The end of S2H training: the hard network of the final masks, projected onto
    the budget band if outside it, its BatchNorm statistics re-estimated on
    ``bn_batches`` training batches, rank 0's buffers on every rank, eval mode.
    Returns whether the projection changed the widths."""
    pruner.sync_from_masks()
    projected = pruner.project()
    used = pruner.recalibrate_bn(train_loader, bn_batches)
    log.info("BatchNorm statistics of the hard network re-estimated on %d batches", used)
    broadcast_buffers(pruner)
    pruner.eval()
    return projected


# ---- plain training -------------------------------------------------------------------
def fit_dense(
    model: nn.Module, train_loader: Iterable[Any], epochs: int, *,
    val_loader: Iterable[Any] | None = None, lr: float = 0.05, momentum: float = 0.9,
    weight_decay: float = 5e-4, nesterov: bool = False,
    device: str | torch.device = "cpu", progress: bool = False, steps_per_epoch: int | None = None, max_nonfinite: int | None = 5,
    keep_heap: bool = True, amp: bool = False,
) -> list[dict[str, float]]:
    """Plain cross-entropy training with the loop, optimiser and schedule :func:`fit`
    uses for the weights (``keep_heap`` and ``amp`` as there). Returns per-epoch
    ``{"epoch", "loss", "acc"[, "val_acc"]}``."""
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    dev = torch.device(device)
    model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay, nesterov=nesterov)
    loop = Loop(model, train_loader, opt, dev,
                LoopSettings(epochs, steps_per_epoch, max_nonfinite, None, amp, progress,
                             keep_heap))
    step = _PlainStep(model)
    history = []
    while loop.state.epoch < epochs:
        sums = loop.run_epoch(step, f"dense epoch {loop.state.epoch + 1}/{epochs}")
        record = {"epoch": loop.state.epoch + 1, "loss": epoch_means(sums, ["loss"])["loss"],
                  "acc": epoch_accuracy(sums, "train")}
        if val_loader is not None:
            record["val_acc"] = _accuracy(model, val_loader, dev)
        history.append(record)
        loop.end_epoch(record)
    model.eval()
    return history


@torch.no_grad()
def _accuracy(model: nn.Module, loader: Iterable[Any], dev: torch.device) -> float:
    was = model.training
    model.eval()
    ok = seen = 0
    for batch in loader:
        x, y = split_batch(batch, dev)
        ok += int((model(x).argmax(-1) == y).sum())
        seen += y.numel()
    model.train(was)
    return ok / max(seen, 1)

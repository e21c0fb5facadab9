"""The one training loop of s2h-fx, shared by :func:`s2h_fx.trainer.fit`, the demo's
dense baseline and ``benchmarks/gap.py``.

What the loop owns: epochs and batches (also of loaders without ``__len__``), the
weight optimiser's step and the cosine schedule, a ``GradScaler``, the guard
against non-finite losses and gradients, progress bars, checkpoints and resuming
them exactly. What a step does (which forwards, which losses, which backward,
what follows the optimiser step) comes from a :class:`TrainStep`.

Non-finite policy: a step whose loss (or, without a GradScaler, gradient) is
NaN or infinite is skipped: no optimiser step, no mask step, no schedule step,
the gradients dropped, the buffers (BatchNorm running statistics, which the
step's forward already updated) put back as they were before it; it is counted in the epoch's ``skipped`` and logged, and
after ``max_nonfinite`` skipped steps in a row :class:`NonFiniteError` stops the
run. With a GradScaler an overflowing *gradient* is the scaler's business (it
lowers the scale and skips, as usual) and is not counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from s2h_fx.checkpoint import FORMAT, VERSION, CheckpointStore, rng_state, set_rng_state
from s2h_fx.dist import agree, average, rank, world_size
from s2h_fx.errors import CheckpointError, InputError, NonFiniteError
from s2h_fx.heap import kept_heap
from s2h_fx.schedule import CosineSchedule

log = logging.getLogger(__name__)

Metrics = dict[str, float]


class TrainStep(Protocol):
    """One kind of training step; the loop calls these in this order per batch:
    ``forward`` (under autocast), ``backward``, then ``after`` (optimiser stepped)
    or ``discard`` (step skipped: gradients dropped, running statistics its
    forward updated put back). ``begin``/``end`` bracket every epoch."""

    def begin(self) -> None: ...
    def end(self) -> None: ...
    def forward(self, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]: ...
    def backward(self, losses: dict[str, torch.Tensor], scaler: Any) -> bool | None: ...
    def after(self) -> Metrics: ...
    def discard(self) -> None: ...
    def params(self) -> list[nn.Parameter]: ...


@dataclass(frozen=True)
class LoopSettings:
    """``epochs``: all epochs of the run (warm-up included). ``max_nonfinite``: stop
    after this many skipped steps in a row (None: never). ``checkpoint_every``: also
    checkpoint every this many batches (None: at the end of each epoch only).
    ``keep_heap``: on the CPU, keep freed memory in the process while an epoch runs
    (:func:`s2h_fx.heap.kept_heap`: otherwise an S2H step may page-fault its
    activations back in, every step until glibc's thresholds settle)."""

    epochs: int
    steps_per_epoch: int | None = None
    max_nonfinite: int | None = 5
    checkpoint_every: int | None = None
    amp: bool = False
    progress: bool = False
    keep_heap: bool = True

    def __post_init__(self) -> None:
        for name in ("steps_per_epoch", "max_nonfinite", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


@dataclass
class RunState:
    """Where a run stands: what a checkpoint holds besides modules and optimisers."""

    epoch: int = 0  # epochs finished (warm-up included)
    step: int = 0  # batches done in the epoch in progress (skipped ones included)
    batches: int = 0  # batches done in the whole run
    consecutive: int = 0  # skipped steps in a row
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, Any] = field(default_factory=dict)  # the epoch in progress
    epoch_rng: dict[str, Any] | None = None  # random states at the epoch's start

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def new_sums() -> dict[str, Any]:
    return {"sums": {}, "n": 0, "skipped": 0, "correct": {}, "seen": 0, "steps": []}


def loader_length(loader: Iterable[Any]) -> int | None:
    """``len(loader)``, or None for a loader without one (a DataLoader over an
    IterableDataset raises TypeError in ``len``)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def split_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        got = type(batch).__name__ + (f" of length {len(batch)}"
                                      if isinstance(batch, (list, tuple)) else "")
        raise InputError(
            f"fit() and evaluate() take batches of (inputs, labels), a tuple or list as a "
            f"DataLoader over a TensorDataset or an ImageFolder yields; got a {got}. For "
            "other batch structures, write the loop yourself with the pruner's steps "
            "(README: Training with S2H)")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError(f"a batch's inputs and labels must be tensors; got "
                         f"({type(x).__name__}, {type(y).__name__})")
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class Loop:
    """Runs epochs of a :class:`TrainStep` over one loader with one optimiser."""

    def __init__(self, module: nn.Module, loader: Iterable[Any], opt: torch.optim.Optimizer,
                 device: torch.device, settings: LoopSettings, *,
                 store: CheckpointStore | None = None, meta: dict[str, Any] | None = None,
                 on_step: Callable[[Metrics], None] | None = None,
                 recorded_later: frozenset[str] = frozenset()) -> None:
        self.module, self.loader, self.opt, self.device = module, loader, opt, device
        self.settings, self.store, self.on_step = settings, store, on_step
        self.meta = meta or {}
        # keys of meta that checkpoints of earlier versions lack: not checked there
        self.recorded_later = recorded_later
        self.weights: list[nn.Parameter] = [p for g in opt.param_groups for p in g["params"]]
        length = settings.steps_per_epoch or loader_length(loader)
        if length == 0:
            raise InputError("train_loader has no batches")
        self.sched = CosineSchedule(opt, settings.epochs, length)
        self.scaler = (torch.amp.GradScaler(device.type)
                       if settings.amp and device.type == "cuda" else None)
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.state = RunState()
        self._resume_rng: dict[str, Any] | None = None

    # ---- checkpoints ------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "meta": dict(self.meta),
                "model": self.module.state_dict(), "optimizer": self.opt.state_dict(),
                "schedule": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "run": self.state.to_dict(), "rng": rng_state(self.loader)}

    def save(self) -> None:
        if self.store is None or rank() != 0:
            return
        path = self.store.save(self.checkpoint(), self.state.batches)
        log.info("checkpoint %s (epoch %d, batch %d of it)", path.name, self.state.epoch + 1,
                 self.state.step)

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Take up the run a checkpoint left off (RNG states at its next batch)."""
        unrecorded = {k: v for k, v in self.meta.items()
                      if k in self.recorded_later and k not in ckpt["meta"]}
        if unrecorded:
            log.warning("the checkpoint does not record %s (written by an earlier s2h-fx): "
                        "resuming without checking that it had %s", ", ".join(unrecorded),
                        ", ".join(f"{k}={v!r}" for k, v in unrecorded.items()))
        for key in {**ckpt["meta"], **self.meta}:
            saved, value = ckpt["meta"].get(key), self.meta.get(key)
            if key in unrecorded:
                continue
            if saved != value:
                raise CheckpointError(
                    f"the checkpoint was written with {key}={saved!r}, this "
                    f"run has {key}={value!r}: resume with the same settings")
        self.module.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["schedule"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(**ckpt["run"])
        if self.state.step == 0:
            set_rng_state(ckpt["rng"], self.loader)
        else:  # replayed at the epoch's start, restored after the replay
            self._resume_rng = ckpt["rng"]

    # ---- epochs -----------------------------------------------------------------
    def batches(self) -> Iterator[Any]:
        """This epoch's batches from where the run stands: mid-epoch after a resume,
        the epoch's order is re-created from its starting random state and the
        batches already done are drawn and dropped."""
        st = self.state
        if st.step == 0:
            st.epoch_rng = rng_state(self.loader)
            st.sums = new_sums()
            return iter(self.loader)
        if st.epoch_rng is None or self._resume_rng is None:
            raise CheckpointError("a mid-epoch checkpoint without its random states")
        set_rng_state(st.epoch_rng, self.loader)
        it = iter(self.loader)
        for done in range(st.step):
            if next(it, None) is None:
                raise CheckpointError(f"the loader yields {done} batches, the checkpoint "
                                      f"was written after {st.step}: not the same data")
        set_rng_state(self._resume_rng, self.loader)
        self._resume_rng = None
        return it

    def run_epoch(self, step: TrainStep, desc: str,
                  postfix: Callable[[Metrics], dict[str, str]] | None = None) -> dict[str, Any]:
        """Train one epoch (the rest of it after a resume); returns its sums."""
        st = self.state
        it = self.batches()
        step.begin()
        try:
            with kept_heap(self.settings.keep_heap and self.device.type == "cpu"), \
                    _progress(it, desc, self.settings.progress, loader_length(self.loader),
                              st.step) as bar:
                for batch in bar:
                    metrics = self._one(step, batch)
                    st.step += 1
                    st.batches += 1
                    every = self.settings.checkpoint_every
                    if every and st.batches % every == 0:
                        self.save()
                    if self.on_step is not None:
                        self.on_step(metrics)
                    if postfix is not None and hasattr(bar, "set_postfix") and "skipped" not in metrics:
                        bar.set_postfix(postfix(metrics))
        finally:
            step.end()
        if st.step == 0:
            raise InputError(f"train_loader yielded no batches in epoch {st.epoch + 1} (an "
                             "exhausted generator? pass a re-iterable loader)")
        self.sched.set_steps_per_epoch(st.step)
        if st.sums["skipped"]:
            log.warning("epoch %d: %d of %d steps skipped for non-finite losses or gradients",
                        st.epoch + 1, st.sums["skipped"], st.step)
        return st.sums

    def end_epoch(self, record: dict[str, Any] | None) -> None:
        """Close the epoch (``record``: appended to the history) and checkpoint."""
        st = self.state
        if record is not None:
            st.history.append(record)
        st.epoch += 1
        st.step = 0
        st.sums, st.epoch_rng = new_sums(), None
        self.save()

    # ---- one batch ------------------------------------------------------------------
    def _one(self, step: TrainStep, batch: Any) -> Metrics:
        x, y = split_batch(batch, self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.settings.amp):
            losses, outputs = step.forward(x, y)
        self.opt.zero_grad(set_to_none=True)
        lr = float(self.opt.param_groups[0]["lr"])
        values, correct = read_scalars(losses, outputs, y)
        finite_loss = agree(all(math.isfinite(v) for v in values.values()))
        ok = finite_loss
        if ok:
            reported = step.backward(losses, self.scaler)
            ok = agree(reported is not False)
            if ok:
                _average_grads(self.weights)
                if reported is None and self.scaler is None:  # the pruner did not check
                    ok = agree(_grads_finite(step.params()))
        if not ok:
            step.discard()  # drops the gradients, puts the running statistics back
            if self.scaler is not None and finite_loss:  # an overflow: the scaler's business
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
                return {**values, "lr": lr, "skipped": 1.0}
            return {**self._skipped(values, "loss" if not finite_loss else "gradient"), "lr": lr}
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        extra = step.after()
        self.sched.step()
        self.state.consecutive = 0
        return self._count(values, correct, y.numel(), {**extra, "lr": lr})

    def _count(self, values: Metrics, correct: dict[str, int], seen: int,
               extra: Metrics) -> Metrics:
        s = self.state.sums
        s["n"] += 1
        s["seen"] += seen
        metrics = {**values, **extra}
        for name, ok in correct.items():
            s["correct"][name] = s["correct"].get(name, 0) + ok
            metrics[f"{name}_acc"] = s["correct"][name] / s["seen"]
        for k, v in metrics.items():
            s["sums"][k] = s["sums"].get(k, 0.0) + v
        s["steps"].append(metrics)
        return metrics

    def _skipped(self, values: Metrics, what: str) -> Metrics:
        st = self.state
        st.sums["skipped"] += 1
        st.consecutive += 1
        terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        log.warning("epoch %d, batch %d: non-finite %s (%s): step skipped, weights, masks "
                    "and optimiser state untouched (%d in a row)", st.epoch + 1, st.step + 1,
                    what, terms, st.consecutive)
        limit = self.settings.max_nonfinite
        if limit is not None and st.consecutive >= limit:
            raise NonFiniteError(
                f"{st.consecutive} training steps in a row had a non-finite {what} (last: "
                f"epoch {st.epoch + 1}, batch {st.step + 1}: {terms}); stopping. The weights "
                "are those of the last finite step. Check the data for NaN or inf, lower "
                "the learning rate, or train without amp; max_nonfinite sets the limit")
        return {**values, "skipped": 1.0}


def read_scalars(losses: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                 y: torch.Tensor) -> tuple[Metrics, dict[str, int]]:
    """The step's loss values and each output's count of correct predictions, in one
    device-to-host read (the non-finite guard needs the losses on the host every
    step; the per-step metrics come with that read at no further cost)."""
    scalars = [v.detach().reshape(()).double() for v in losses.values()]
    scalars += [(out.detach().argmax(-1) == y).sum().double() for out in outputs.values()]
    if not scalars:
        return {}, {}
    got = torch.stack(scalars).tolist()
    values = dict(zip(losses, got[:len(losses)]))
    correct = {name: int(v) for name, v in zip(outputs, got[len(losses):])}
    return values, correct


def epoch_means(sums: dict[str, Any], keys: Iterable[str]) -> Metrics:
    n = max(sums["n"], 1)
    return {k: sums["sums"].get(k, 0.0) / n for k in keys}


def epoch_accuracy(sums: dict[str, Any], name: str) -> float:
    return sums["correct"].get(name, 0) / max(sums["seen"], 1)


def _grads_finite(params: list[nn.Parameter]) -> bool:
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


def _average_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks (one all-reduce)."""
    if world_size() < 2 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, average(grads)):
        p.grad = g


class _progress:
    """A tqdm progress bar when asked for, else the plain iterator."""

    def __init__(self, it: Iterator[Any], desc: str, enabled: bool, total: int | None,
                 initial: int) -> None:
        self.it, self.desc, self.enabled = it, desc, enabled
        self.total, self.initial = total, initial

    def __enter__(self) -> Any:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(self.it, desc=self.desc, leave=False, dynamic_ncols=True,
                            total=self.total, initial=self.initial)
            return self.bar
        return self.it

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.close()

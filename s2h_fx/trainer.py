"""``fit``: S2H training with sensible defaults, built only from the pruner's public
steps (forward, losses, backward, mask_step), so a user's own loop can do the same."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from s2h_fx.errors import InputError

if TYPE_CHECKING:
    from s2h_fx.pruner import Pruner

log = logging.getLogger(__name__)


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

    @property
    def val_gap(self) -> float | None:
        if self.val_soft_acc is None or self.val_hard_acc is None:
            return None
        return self.val_soft_acc - self.val_hard_acc


def _split(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


@torch.no_grad()
def evaluate(pruner: Pruner, loader: Iterable[Any], device: torch.device) -> tuple[float, float]:
    """(soft accuracy, hard accuracy) in eval mode."""
    was = pruner.training
    pruner.eval()
    soft_ok = hard_ok = total = 0
    for batch in loader:
        x, y = _split(batch, device)
        soft_ok += int((pruner.soft_forward(x).argmax(-1) == y).sum())
        hard_ok += int((pruner(x).argmax(-1) == y).sum())
        total += y.numel()
    pruner.train(was)
    return soft_ok / max(total, 1), hard_ok / max(total, 1)


def fit(
    pruner: Pruner,
    train_loader: Iterable[Any],
    epochs: int = 30,
    *,
    val_loader: Iterable[Any] | None = None,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    warmup_epochs: int = 0,
    device: str | torch.device | None = None,
    amp: bool = False,
    bn_batches: int = 20,
    progress: bool = True,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> list[EpochRecord]:
    """Train the soft and hard branches with S2H; leave the pruner in eval mode at the
    trained hard network (BatchNorm re-estimated, projected onto the budget if above).

    Weights: SGD with momentum and a cosine schedule. Masks: the built-in mask
    optimiser, starting from full width. ``warmup_epochs`` of plain training of
    the full network come first. ``amp`` uses ``torch.autocast`` (bfloat16 on CPU).

    Under ``torch.distributed`` (torchrun; give each rank its shard of the data,
    e.g. with a ``DistributedSampler``) the weights' gradients are averaged over
    the ranks every step (the mask logits' by :meth:`Pruner.backward`), only rank
    0 shows progress bars, and at the end every rank gets rank 0's buffers
    (BatchNorm statistics of both networks), so all ranks hold the same pruner.
    """
    if epochs < 0 or warmup_epochs < 0:
        raise ValueError("epochs and warmup_epochs must be >= 0")
    if isinstance(train_loader, Sized) and len(train_loader) == 0:
        raise InputError("train_loader has no batches")
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    pruner.to(dev)
    steps_per_epoch = len(train_loader) if isinstance(train_loader, Sized) else 0
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    total = max((epochs + warmup_epochs) * steps_per_epoch, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    scaler = torch.amp.GradScaler(dev.type) if amp and dev.type == "cuda" else None
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    if _world_size() > 1:
        progress = progress and torch.distributed.get_rank() == 0
    weights = pruner.weight_parameters()
    if warmup_epochs:
        _warmup(pruner, train_loader, warmup_epochs, opt, sched, dev, progress)
    for mask in pruner.masks().values():
        mask.reset_full_width()
    pruner.update_importance()
    history = []
    for epoch in range(epochs):
        pruner.train()
        sums: dict[str, float] = {}
        soft_ok = hard_ok = seen = 0
        record = EpochRecord(epoch + 1, {}, 0.0, 0.0, 0.0)
        with _bar(train_loader, f"S2H epoch {epoch + 1}/{epochs}", progress) as bar:
            for batch in bar:
                x, y = _split(batch, dev)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                    soft, hard = pruner(x)
                    losses = pruner.losses((soft, hard), y)
                opt.zero_grad(set_to_none=True)
                pruner.backward(losses, grad_scaler=scaler)
                _average_grads(weights)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                pruner.mask_step()
                sched.step()
                step = {k: float(v.detach()) for k, v in losses.items()}
                step["flops"] = float(pruner.flops_ratio(pruner.mask_widths()))
                soft_ok += int((soft.argmax(-1) == y).sum())
                hard_ok += int((hard.argmax(-1) == y).sum())
                seen += y.numel()
                step["soft_acc"], step["hard_acc"] = soft_ok / seen, hard_ok / seen
                for k, v in step.items():
                    sums[k] = sums.get(k, 0.0) + v
                record.steps.append(step)
                if on_step is not None:
                    on_step(step)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix({"L": f"{step['task']:.3f}", "R": f"{step['resource']:.4f}",
                                     "Gh": f"{step['kd_hard']:.3f}", "Gs": f"{step['kd_soft']:.3f}",
                                     "flops": f"{step['flops']:.3f}",
                                     "acc s/h": f"{step['soft_acc']:.2f}/{step['hard_acc']:.2f}"})
        if not record.steps:
            raise InputError(f"train_loader yielded no batches in epoch {epoch + 1} (an "
                             "exhausted generator? pass a re-iterable loader)")
        n = len(record.steps)
        record.losses = {k: sums.get(k, 0.0) / n for k in ("task", "resource", "kd_hard", "kd_soft")}
        record.flops_ratio = float(pruner.flops_ratio(pruner.mask_widths()))
        record.soft_acc, record.hard_acc = soft_ok / max(seen, 1), hard_ok / max(seen, 1)
        if val_loader is not None:
            record.val_soft_acc, record.val_hard_acc = evaluate(pruner, val_loader, dev)
            log.info("epoch %d: val soft %.4f hard %.4f gap %.4f, hard FLOPs %.4f", epoch + 1,
                     record.val_soft_acc, record.val_hard_acc, record.val_gap,
                     record.flops_ratio)
        history.append(record)
    pruner.sync_from_masks()  # the hard network of the final masks
    pruner.project()
    used = pruner.recalibrate_bn(train_loader, bn_batches)
    log.info("BatchNorm statistics of the hard network re-estimated on %d batches", used)
    _broadcast_buffers(pruner)
    pruner.eval()
    return history


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _average_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks (one all-reduce); a no-op
    without torch.distributed. A non-finite gradient on any rank reaches every rank,
    so a GradScaler skips the step everywhere."""
    if _world_size() < 2 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= _world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype, copy=True)
        offset += g.numel()


def _broadcast_buffers(module: nn.Module) -> None:
    """Every rank takes rank 0's buffers (running statistics); a no-op without
    torch.distributed."""
    if _world_size() < 2:
        return
    for buf in module.buffers():
        torch.distributed.broadcast(buf, src=0)


def _warmup(pruner: Pruner, loader: Iterable[Any], epochs: int, opt: torch.optim.Optimizer,
            sched: Any, dev: torch.device, progress: bool) -> None:
    """Plain training of the full-width network (masks held at 1)."""
    masks = pruner.masks().values()
    for m in masks:
        m.fixed.fill_(1.0)
        m.use_fixed = True
    try:
        pruner.graph_module.train()
        for epoch in range(epochs):
            for batch in _bar(loader, f"warm-up {epoch + 1}/{epochs}", progress):
                x, y = _split(batch, dev)
                loss = nn.functional.cross_entropy(pruner.graph_module(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _average_grads(pruner.weight_parameters())
                opt.step()
                sched.step()
    finally:
        for m in masks:
            m.use_fixed = False


class _bar:
    """A tqdm progress bar when asked for, else the plain iterable."""

    def __init__(self, iterable: Iterable[Any], desc: str, enabled: bool) -> None:
        self.iterable, self.desc, self.enabled = iterable, desc, enabled

    def __enter__(self) -> Any:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(self.iterable, desc=self.desc, leave=False, dynamic_ncols=True)
            return self.bar
        return self.iterable

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.close()

    def __iter__(self) -> Any:
        with self as it:
            yield from it

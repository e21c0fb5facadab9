"""The shared training loop: loaders without a length, the cosine schedule, the
ablation methods, FLOPs counting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import s2h_fx
import s2h_fx.trainer
from s2h_fx.config import S2HConfig
from s2h_fx.measure import count_flops
from s2h_fx.schedule import CosineSchedule, cosine_factor
from s2h_fx.trainer import fit_dense

BATCH, BATCHES = 8, 4


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)).mean((2, 3)))


def tensors(n: int = BATCH * BATCHES) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return x, y


class Stream(IterableDataset):
    """An IterableDataset without __len__: yields single samples."""

    def __iter__(self):
        x, y = tensors()
        yield from zip(x, y)


class Reiterable:
    """Generator-like: a fresh generator of batches on every iter(), no __len__."""

    def __iter__(self):
        x, y = tensors()
        return ((x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(y), BATCH))


def pruner() -> s2h_fx.Pruner:
    torch.manual_seed(0)
    x, _ = tensors(2)
    return s2h_fx.prune_graph(Tiny(), 0.5, example_inputs=(x,), divisor=2,
                              config=S2HConfig(mask_lr=0.2))


@pytest.mark.parametrize("kind", ["dataloader", "reiterable"])
def test_loader_without_length_keeps_a_positive_learning_rate(kind: str) -> None:
    loader = DataLoader(Stream(), batch_size=BATCH) if kind == "dataloader" else Reiterable()
    with pytest.raises(TypeError):
        len(loader)  # type: ignore[arg-type]
    p = pruner()
    lrs: list[float] = []
    epochs, lr = 3, 0.05
    history = p.fit(loader, epochs, lr=lr, progress=False, on_step=lambda s: lrs.append(s["lr"]))
    assert len(history) == epochs and len(lrs) == epochs * BATCHES  # reached the end
    # epoch 1: the length is being measured, the rate stays at the base rate; then the
    # cosine of a 12-step run, as if the length had been known from the start
    assert lrs[:BATCHES] == [lr] * BATCHES
    total = epochs * BATCHES
    for t in range(BATCHES, total):
        assert lrs[t] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * t / total)))
    assert min(lrs) > 0 and lrs[-1] < lrs[BATCHES] < lr
    assert all(math.isfinite(v) for v in history[-1].losses.values())
    assert not p.training and 0.5 - 0.03 <= float(p.flops_ratio()) <= 0.5 + 0.005


def test_steps_per_epoch_gives_the_cosine_from_the_first_step() -> None:
    lrs: list[float] = []
    pruner().fit(Reiterable(), 2, lr=0.1, progress=False, steps_per_epoch=BATCHES,
                 on_step=lambda s: lrs.append(s["lr"]))
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert lrs == pytest.approx(expected)


def test_cosine_schedule_counts_steps_and_round_trips() -> None:
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = CosineSchedule(opt, epochs=2, steps_per_epoch=5)
    assert opt.param_groups[0]["lr"] == 1.0
    for _ in range(5):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # half way: cos(pi/2) = 0
    state = sched.state_dict()
    other = CosineSchedule(torch.optim.SGD([w], lr=1.0), epochs=2, steps_per_epoch=None)
    assert other.factor() == 1.0  # unknown length: the base rate
    other.load_state_dict(state)
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    assert cosine_factor(10, 10) == 0.0 and cosine_factor(99, 10) == 0.0


def test_dataloader_over_an_iterable_dataset_trains_dense() -> None:
    torch.manual_seed(0)
    model = Tiny()
    history = fit_dense(model, DataLoader(Stream(), batch_size=BATCH), 2,
                        val_loader=Reiterable(), lr=0.05)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h["loss"]) and 0 <= h["val_acc"] <= 1 for h in history)


def test_methods_train_and_restore_the_masks() -> None:
    p = pruner()
    modes: list[bool] = []
    masks = list(p.masks().values())
    p.fit(Reiterable(), 1, progress=False, method="hard_st", finish=False,
          on_step=lambda s: modes.append(all(m.straight_through for m in masks)))
    assert modes == [True] * BATCHES  # straight-through during training ...
    assert not any(m.straight_through for m in masks)  # ... and not after
    assert p.training  # finish=False: no projection, no eval mode
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        p.fit(Reiterable(), 1, progress=False, method="nope")


def test_count_flops_of_a_linear_layer_in_eval_mode() -> None:
    layer = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5)).train()
    mean = layer[1].running_mean.clone()
    assert count_flops(layer, torch.randn(3, 10)) == 2 * 3 * 10 * 5  # multiply-adds x 2
    assert layer.training and torch.equal(layer[1].running_mean, mean)


def test_nesterov_reaches_the_weight_optimiser(tmp_path) -> None:
    """fit_dense and fit build their SGD with nesterov when asked (the quality
    benchmark's protocol): the weights differ from plain momentum, and the
    optimiser state fit checkpoints says nesterov."""
    runs = []
    for nesterov in (False, True):
        torch.manual_seed(0)
        model = Tiny()
        fit_dense(model, Reiterable(), 2, nesterov=nesterov, steps_per_epoch=BATCHES)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(*runs))
    p = pruner()
    s2h_fx.trainer.fit(p, Reiterable(), 1, nesterov=True, progress=False, bn_batches=1,
                       checkpoint=tmp_path, steps_per_epoch=BATCHES)
    saved = sorted(tmp_path.glob("*.pt"))
    assert saved
    state = torch.load(saved[-1], weights_only=True)
    groups = [v for k, v in _walk(state) if k == "param_groups"]
    assert groups and all(g["nesterov"] for gs in groups for g in gs)


def _walk(obj, key=None):
    """(key, value) of every entry of nested dicts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v, k)


def test_fit_dense_trains_under_autocast_when_asked() -> None:
    """fit_dense(amp=True) runs its forwards under fit's autocast (bfloat16 on the CPU)."""
    for amp, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        torch.manual_seed(0)
        model = Tiny()
        seen: list[torch.dtype] = []
        model.head.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        fit_dense(model, Reiterable(), 1, amp=amp, steps_per_epoch=BATCHES)
        assert seen and set(seen) == {dtype}, amp

"""The weights' learning-rate schedule: cosine decay from the base rate to 0 over
the whole run, one value per optimiser step, the same for ``fit``, the demo's
dense baseline and ``benchmarks/gap.py``.

The schedule counts the optimiser steps actually taken (a step skipped for a
non-finite loss does not advance it). Its length is ``epochs x steps_per_epoch``.
For a loader without ``__len__`` (an ``IterableDataset``, a generator-like
re-iterable) and no ``steps_per_epoch`` given, the length is unknown during the
first epoch: the rate stays at the base rate for that epoch, the epoch's length
is measured, and from the second epoch on the rate is what it would have been
with the length known from the start.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def cosine_factor(step: int, total: int) -> float:
    """0.5 (1 + cos(pi t / T)) with t clamped to [0, T]: 1 at the start, 0 at the end."""
    total = max(total, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0), total) / total))


class CosineSchedule:
    """Sets each parameter group's ``lr`` to ``base_lr x cosine_factor(t, T)``.

    ``t``: optimiser steps taken; ``T = epochs x steps_per_epoch``, or unknown
    (``steps_per_epoch=None``) until :meth:`set_steps_per_epoch`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int,
                 steps_per_epoch: int | None = None) -> None:
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.steps = 0
        self.apply()

    @property
    def total(self) -> int | None:
        """Optimiser steps of the whole run, or None while the epoch length is unknown."""
        return None if self.steps_per_epoch is None else self.epochs * self.steps_per_epoch

    def factor(self) -> float:
        total = self.total
        return 1.0 if total is None else cosine_factor(self.steps, total)

    def apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        """After an optimiser step."""
        self.steps += 1
        self.apply()

    def set_steps_per_epoch(self, n: int) -> None:
        """The measured length of an epoch (a loader without ``__len__``)."""
        if self.steps_per_epoch is None and n > 0:
            self.steps_per_epoch = n
            self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "base_lrs": list(self.base_lrs), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = int(state["epochs"])
        spe = state["steps_per_epoch"]
        self.steps_per_epoch = None if spe is None else int(spe)
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self.steps = int(state["steps"])
        self.apply()

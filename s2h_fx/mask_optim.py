"""The mask optimiser: its own SGD-style step over the mask logits.

The task/distillation gradient and the resource gradient are balanced by norm:
both are normalised, and the resource direction is weighted by how far the hard
FLOPs ratio is from the budget in units of the tolerance (capped). Far from the
budget the resource gradient dominates; inside the tolerance the task and
distillation gradient lead. After each step the logits are re-centred.
"""

from __future__ import annotations

from typing import Any

import torch

from s2h_fx.masks import ChannelMask


class MaskOptimizer:
    def __init__(self, masks: list[ChannelMask], lr: float, tolerance: float, cap: float) -> None:
        self.masks = masks
        self.lr, self.tolerance, self.cap = lr, tolerance, cap
        self.steps = 0
        self.last_balance = 0.0

    @torch.no_grad()
    def step(self, task: list[torch.Tensor], resource: list[torch.Tensor], gap: float) -> None:
        """``task``/``resource``: per-mask gradients; ``gap``: hard FLOPs ratio - budget."""
        if not self.masks:
            return
        gt, gr = torch.cat([t.flatten() for t in task]), torch.cat([r.flatten() for r in resource])
        if not (torch.isfinite(gt).all() and torch.isfinite(gr).all()):
            return  # an overflowed (AMP) step: skip it, as GradScaler skips the weights
        nt, nr = gt.norm(), gr.norm()
        balance = min(abs(gap) / self.tolerance, self.cap)
        self.last_balance = balance
        direction = torch.zeros_like(gt)
        if nt > 0:
            direction += gt / nt
        if nr > 0:
            direction += balance * gr / nr
        offset = 0
        for mask in self.masks:
            k = mask.logits.numel()
            mask.logits.sub_(self.lr * direction[offset : offset + k].to(mask.logits.dtype))
            mask.logits.sub_(mask.logits.mean())
            offset += k
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "tolerance": self.tolerance, "cap": self.cap, "steps": self.steps,
                "last_balance": self.last_balance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.tolerance, self.cap = state["lr"], state["tolerance"], state["cap"]
        self.steps, self.last_balance = state["steps"], state["last_balance"]

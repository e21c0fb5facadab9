"""The mask optimiser: its own SGD-style step over the mask logits.

The task/distillation gradient and the resource gradient are balanced by norm:
both are normalised, and the resource direction is weighted by how far the hard
FLOPs ratio is from the budget in units of the tolerance (capped). Far from the
budget the resource gradient dominates; inside the tolerance the task and
distillation gradient lead. After each step the logits are re-centred.

Options (off by default, S2HConfig ``mask_momentum``/``mask_nesterov``): a momentum
buffer per mask over that combined direction ``d``, as torch's SGD keeps one
(no dampening): ``b = momentum b + d`` (``b = d`` at the first step), the step
``b`` or, with Nesterov, ``d + momentum b``. ``lr_scale`` multiplies the step size
``lr``: ``fit`` sets it to the weights' schedule factor (lr now / base lr) when
``mask_lr_follows_schedule`` is on; a user's loop can set it the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from s2h_fx.masks import ChannelMask

if TYPE_CHECKING:
    from s2h_fx.config import S2HConfig


class MaskOptimizer:
    def __init__(self, masks: list[ChannelMask], lr: float, tolerance: float, cap: float,
                 momentum: float = 0.0, nesterov: bool = False) -> None:
        self.masks = masks
        self.lr, self.tolerance, self.cap = lr, tolerance, cap
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.lr_scale = 1.0  # the step size is lr x lr_scale
        self.buffers: list[torch.Tensor] = []  # one momentum buffer per mask, once stepped
        self.steps = 0
        self.last_balance = 0.0

    @classmethod
    def from_config(cls, masks: list[ChannelMask], config: S2HConfig) -> MaskOptimizer:
        """The mask optimiser that ``config`` describes."""
        return cls(masks, config.mask_lr, config.tolerance, config.balance_cap,
                   config.mask_momentum, config.mask_nesterov)

    def configure(self, config: S2HConfig) -> None:
        """Take ``config``'s momentum and Nesterov setting (the buffers are kept)."""
        self.momentum, self.nesterov = float(config.mask_momentum), bool(config.mask_nesterov)

    @torch.no_grad()
    def step(self, task: list[torch.Tensor], resource: list[torch.Tensor], gap: float) -> None:
        """``task``/``resource``: per-mask gradients; ``gap``: hard FLOPs ratio - budget.

        Runs on the logits' device with no host read: a non-finite gradient (an
        overflowed AMP step) turns the step into a no-op on the device (logits and
        momentum buffers keep their values, as GradScaler skips the weights) instead
        of a host-side early return; ``steps`` counts the calls."""
        if not self.masks:
            return
        gt, gr = torch.cat([t.flatten() for t in task]), torch.cat([r.flatten() for r in resource])
        finite = torch.isfinite(gt).all() & torch.isfinite(gr).all()
        nt, nr = gt.norm(), gr.norm()
        balance = min(abs(gap) / self.tolerance, self.cap)
        self.last_balance = balance
        zero = torch.zeros_like(gt)
        # the same arithmetic, in the same order, as the host-side version was
        direction = (torch.where(nt > 0, gt / nt, zero)
                     + torch.where(nr > 0, balance * gr / nr, zero))
        direction = torch.where(finite, direction, zero)
        lr = self.lr * self.lr_scale
        offset = 0
        for i, mask in enumerate(self.masks):
            k = mask.logits.numel()
            d = direction[offset : offset + k].view_as(mask.logits).to(mask.logits.dtype)
            step = torch.where(finite, lr * self._momentum(i, d, finite), 0.0)
            mask.logits.sub_(step)
            mask.logits.sub_(mask.logits.mean())
            offset += k
        self.steps += 1

    def _momentum(self, i: int, d: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        """The step direction of mask ``i`` from its direction ``d`` (as torch's SGD);
        the buffer is left as it was where ``finite`` is false."""
        if self.momentum == 0:
            return d
        if len(self.buffers) <= i:
            self.buffers.append(torch.where(finite, d, torch.zeros_like(d)))
        else:
            buf = self.buffers[i]
            buf.copy_(torch.where(finite, buf * self.momentum + d, buf))
        buf = self.buffers[i]
        return d + self.momentum * buf if self.nesterov else buf

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "tolerance": self.tolerance, "cap": self.cap, "steps": self.steps,
                "last_balance": self.last_balance, "momentum": self.momentum,
                "nesterov": self.nesterov, "lr_scale": self.lr_scale,
                "buffers": [b.clone() for b in self.buffers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also takes a state saved before the momentum options (no momentum then)."""
        self.lr, self.tolerance, self.cap = state["lr"], state["tolerance"], state["cap"]
        self.steps, self.last_balance = state["steps"], state["last_balance"]
        self.momentum = float(state.get("momentum", 0.0))
        self.nesterov = bool(state.get("nesterov", False))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        buffers = list(state.get("buffers", []))
        if len(buffers) > len(self.masks):
            raise ValueError(f"the state has {len(buffers)} momentum buffers for "
                             f"{len(self.masks)} masks")
        for b, m in zip(buffers, self.masks):
            if tuple(b.shape) != tuple(m.logits.shape):
                raise ValueError(f"a momentum buffer of shape {tuple(b.shape)} for mask logits "
                                 f"of shape {tuple(m.logits.shape)}")
        self.buffers = [b.detach().clone().to(m.logits.device, m.logits.dtype)
                        for b, m in zip(buffers, self.masks)]

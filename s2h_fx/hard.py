"""The hard branch: the sub-network of the current widths, computed at its own size.

``run_hard`` calls the skeleton (the emitted graph at the current widths) with
``functional_call`` on the live weights sliced to the kept channels, so the
compute scales with the kept width and gradients reach the full-width weights
through the slicing. The slicing takes index tensors on the device
(:meth:`s2h_fx.state.WidthState.cuts`): the skeleton depends on the widths only,
so a change of the kept channels costs no re-emission and no host read. The hard network keeps its own BatchNorm running
statistics (``HardStats``): it sees other activations than the soft network.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from s2h_fx.passes.emit_pruned import emit_pruned, mirror_modes, slice_tensor
from s2h_fx.passes.plan_surgery import SurgeryPlan

Cuts = tuple[tuple[int, torch.Tensor], ...]  # (axis, kept positions) per sliced axis
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class HardStats(nn.Module):
    """Buffers mirroring every BatchNorm running statistic of the graph, by path."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.names: dict[str, str] = {}
        for mname, m in gm.named_modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                for buf in _BN_BUFFERS:
                    t = getattr(m, buf, None)
                    if t is not None:
                        key = f"{mname}.{buf}".replace(".", "__")
                        self.register_buffer(key, t.detach().clone())
                        self.names[f"{mname}.{buf}"] = key

    def get(self, path: str) -> torch.Tensor:
        return getattr(self, self.names[path])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {path: self.get(path) for path in self.names}

    def write_kept(self, path: str, params: dict[str, Cuts], value: torch.Tensor) -> None:
        """Store ``value`` (a statistic of the kept channels, ``params[path]`` giving
        their positions) into the full-width buffer."""
        full = self.get(path)
        cuts = params.get(path, ())
        if cuts:
            (axis, index), = cuts
            full.index_copy_(axis, index.to(full.device), value.to(full.dtype))
        else:
            full.copy_(value)


def named_tensors(gm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers of the graph, the masks' own excepted."""
    out: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in gm.named_parameters() if not n.startswith("s2h_mask")
    ]
    out += [(n, b) for n, b in gm.named_buffers() if not n.startswith("s2h_mask")]
    return out


def run_hard(gm: fx.GraphModule, skeleton: fx.GraphModule, params: dict[str, Cuts],
             stats: HardStats, training: bool, args: tuple[Any, ...]) -> Any:
    """The hard network's output (``params``: path -> kept positions per sliced axis,
    index tensors on the tensors' device); in training mode its kept channels'
    running statistics are updated in ``stats``."""
    tensors, sliced_stats = {}, {}
    for name, t in named_tensors(gm):
        cuts = params.get(name, ())
        if name in stats.names:
            t = stats.get(name)
            sliced_stats[name] = slice_tensor(t, cuts) if cuts else t
            tensors[name] = sliced_stats[name]
        else:
            tensors[name] = slice_tensor(t, cuts)
    mirror_modes(skeleton, training)
    out = functional_call(skeleton, tensors, args)
    if training:
        with torch.no_grad():
            for name, updated in sliced_stats.items():
                if params.get(name):
                    stats.write_kept(name, params, updated)
    return out


@torch.no_grad()
def recalibrate(gm: fx.GraphModule, plan: SurgeryPlan, stats: HardStats,
                batches: Iterable[Any], num_batches: int) -> int:
    """Re-estimate the hard network's BatchNorm statistics (a cumulative average
    over ``num_batches`` training batches) into ``stats``; returns batches used."""
    emitted = emit_pruned(gm, plan, overrides=stats.tensors())
    norms = {n: m for n, m in emitted.named_modules()
             if isinstance(m, _BatchNorm) and m.track_running_stats}
    if not norms:
        return 0
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None
    emitted.train()
    device = next((p.device for p in emitted.parameters()), torch.device("cpu"))
    used = 0
    for batch in batches:
        if used >= num_batches:
            break
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        emitted(x.to(device))
        used += 1
    for name, m in norms.items():
        for buf in _BN_BUFFERS:
            stats.write_kept(f"{name}.{buf}", plan.params, getattr(m, buf))
    return used


def running_stat_buffers(*modules: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm running statistic in ``modules`` (and HardStats' mirrors)."""
    out: list[torch.Tensor] = []
    for module in modules:
        if isinstance(module, HardStats):
            out += list(module.buffers())
            continue
        for m in module.modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                out += [t for t in (getattr(m, b, None) for b in _BN_BUFFERS) if t is not None]
    return out

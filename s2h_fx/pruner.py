"""The public entry point: :func:`prune_graph` and the :class:`Pruner` module."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.func import functional_call

from s2h_fx.channels import GroupingResult
from s2h_fx.config import PruneConfig
from s2h_fx.errors import InputError, InvariantError, NoPrunableChannelsError
from s2h_fx.masks import ChannelMask
from s2h_fx.one_shot import choose_widths, class_importance, keep_top
from s2h_fx.passes import (  # noqa: I001
    build_flops_model,
    emit_pruned,
    find_channel_groups,
    insert_masks,
    plan_surgery,
    trace_model,
)
from s2h_fx.passes.build_flops_model import FlopsModel
from s2h_fx.passes.emit_pruned import slice_tensor
from s2h_fx.passes.insert_masks import mask_name
from s2h_fx.passes.plan_surgery import SurgeryPlan

log = logging.getLogger(__name__)


def prune_graph(
    model: nn.Module,
    budget: float,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    divisor: int = 8,
    strict: bool = False,
) -> Pruner:
    """Trace ``model``, group its coupled channels, insert masks and choose widths.

    ``budget`` is the fraction of the whole network's FLOPs (as
    ``torch.utils.flop_counter`` counts them on ``example_inputs``) to keep.
    The user's model is not modified.
    """
    config = PruneConfig(budget, divisor, strict)
    if example_inputs is None:
        raise InputError(
            "example_inputs is required to trace shapes, e.g. "
            "prune_graph(model, 0.5, example_inputs=(torch.randn(1, 3, 224, 224),))"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace_model(model, tuple(example_inputs))
    grouping = find_channel_groups(gm, divisor=config.divisor, strict=config.strict)
    if not grouping.prunable:
        raise NoPrunableChannelsError(
            f"{type(model).__name__} has no prunable channel group; why each is frozen:\n"
            + grouping.table()
        )
    flops = build_flops_model(gm, grouping)
    gm = insert_masks(gm, grouping)
    pruner = Pruner(gm, grouping, flops, config)
    pruner.train(model.training)
    return pruner


class Pruner(nn.Module):
    """Holds the masked training graph and the current widths.

    ``eval()`` mode: ``pruner(x)`` runs the hard network, exactly what
    :meth:`export` emits. ``train()`` mode: returns ``(soft, hard)``.
    """

    def __init__(
        self, gm: fx.GraphModule, grouping: GroupingResult, flops: FlopsModel,
        config: PruneConfig,
    ) -> None:
        super().__init__()
        self.graph_module = gm
        self.grouping = grouping
        self.flops_model = flops
        self.config = config
        self.importance = class_importance(gm, grouping)
        self._plan: SurgeryPlan | None = None
        self._skeleton: fx.GraphModule | None = None
        self.set_widths(choose_widths(flops, grouping, self.importance, config.budget))

    # ---- inspection ------------------------------------------------------
    @property
    def groups(self) -> _GroupTable:
        return _GroupTable(self.grouping, self.widths)

    @property
    def widths(self) -> dict[int, int]:
        assert self._plan is not None
        return dict(self._plan.widths)

    @property
    def plan(self) -> SurgeryPlan:
        assert self._plan is not None
        return self._plan

    def masks(self) -> dict[int, ChannelMask]:
        return {g.index: self.graph_module.get_submodule(mask_name(g.index))  # type: ignore[misc]
                for g in self.grouping.prunable}

    def flops(self, widths: dict[int, Any] | None = None) -> Any:
        """FLOPs of the hard network at ``widths`` (default: the current widths)."""
        return self.flops_model(self.widths if widths is None else widths)

    def flops_ratio(self, widths: dict[int, Any] | None = None) -> Any:
        return self.flops(widths) / self.flops_model.total

    # ---- widths ----------------------------------------------------------
    def set_widths(self, widths: dict[int, int], keep: dict[int, np.ndarray] | None = None) -> None:
        """Set each group's width (and optionally which classes it keeps)."""
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
        if keep is None:
            keep = keep_top(self.grouping, self.importance, merged)
        self._plan = plan_surgery(self.graph_module, self.grouping, keep)
        self._skeleton = emit_pruned(self.graph_module, self._plan, share=True)
        for g, mask in self.masks().items():
            values = torch.zeros(mask.size)
            values[torch.as_tensor(keep[g])] = 1.0
            mask.values.copy_(values)

    # ---- running ---------------------------------------------------------
    def soft_forward(self, *args: Any) -> Any:
        """The full-width network with every channel scaled by its mask value."""
        return self.graph_module(*args)

    def hard_forward(self, *args: Any) -> Any:
        """The sub-network at the current widths: weights sliced, only kept channels computed."""
        assert self._plan is not None and self._skeleton is not None
        tensors = {}
        for name, t in _named_tensors(self.graph_module):
            tensors[name] = slice_tensor(t, self._plan.params.get(name, ()))
        return functional_call(self._skeleton, tensors, args)

    def forward(self, *args: Any) -> Any:
        if self.training:
            return self.soft_forward(*args), self.hard_forward(*args)
        return self.hard_forward(*args)

    def export(self) -> fx.GraphModule:
        """The physically pruned network (a fresh GraphModule, in eval mode)."""
        assert self._plan is not None
        pruned = emit_pruned(self.graph_module, self._plan)
        if any(n.startswith("s2h_mask") for n, _ in pruned.named_modules()):
            raise InvariantError("mask modules left in the emitted graph")
        return pruned.eval()


def _named_tensors(gm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in gm.named_parameters() if not n.startswith("s2h_mask")
    ]
    out += [(n, b) for n, b in gm.named_buffers() if not n.startswith("s2h_mask")]
    return out


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

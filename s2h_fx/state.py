"""The one state of the widths.

A pruner's sub-network is held in one place: the masks. Each group's
``ChannelMask`` holds its logits (which give the hard width n) and its rank
buffer (which channels are the top n). Everything else that depends on the
widths is a *view* computed from that state and cached by its value:

* the widths and kept channels (``Selection``);
* the ``SurgeryPlan`` (which slices, which rewritten arguments);
* the skeleton: the emitted graph at those widths whose parameters the hard
  branch swaps in with ``functional_call``.

Nothing else stores widths, so the eval-mode network, the train-mode hard
branch, the masked oracle, the FLOPs and ``export()`` always describe the same
sub-network, whichever of them is called first and in whichever mode.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from s2h_fx.channels import GroupingResult
from s2h_fx.importance import keep_from_ranks
from s2h_fx.masks import ChannelMask
from s2h_fx.passes.emit_pruned import emit_pruned
from s2h_fx.passes.plan_surgery import SurgeryPlan, plan_surgery

_SKELETONS_KEPT = 8


@dataclass(frozen=True, eq=False)
class Selection:
    """The sub-network the masks describe now: width and kept classes per group."""

    widths: dict[int, int]
    keep: dict[int, np.ndarray]

    def key(self) -> tuple[tuple[int, ...], bytes]:
        order = sorted(self.widths)
        return (tuple(self.widths[g] for g in order),
                b"".join(self.keep[g].astype(np.int64).tobytes() for g in order))


class WidthState:
    """Reads the masks and keeps the views of them (plan, skeleton) in step."""

    def __init__(self, gm: fx.GraphModule, grouping: GroupingResult,
                 masks: dict[int, ChannelMask]) -> None:
        self.gm, self.grouping, self.masks = gm, grouping, masks
        self._plan_key: tuple[tuple[int, ...], bytes] | None = None
        self._plan: SurgeryPlan | None = None
        self._skeletons: OrderedDict[tuple[int, ...], fx.GraphModule] = OrderedDict()
        self.plan_builds = 0  # how often a plan was built (a test counts them)
        self.skeleton_builds = 0

    def widths(self) -> dict[int, int]:
        """Hard width n of every mask now."""
        with torch.no_grad():
            return {g: int(round(float(m.hard_width()))) for g, m in self.masks.items()}

    def ranks(self) -> dict[int, torch.Tensor]:
        return {g: m.rank for g, m in self.masks.items()}

    def selection(self) -> Selection:
        widths = self.widths()
        return Selection(widths, keep_from_ranks(self.ranks(), widths))

    def plan(self) -> SurgeryPlan:
        """The surgery plan of the masks' sub-network (rebuilt only when it changed)."""
        sel = self.selection()
        key = sel.key()
        if self._plan is None or key != self._plan_key:
            self._plan = plan_surgery(self.gm, self.grouping, sel.keep)
            self._plan_key = key
            self.plan_builds += 1
        return self._plan

    def skeleton(self, plan: SurgeryPlan) -> fx.GraphModule:
        """The emitted graph at ``plan``'s widths, sharing the live tensors; its
        structure depends on the widths only, so which channels are kept does not
        re-emit it."""
        key = tuple(plan.widths[g] for g in sorted(plan.widths))
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            if len(self._skeletons) >= _SKELETONS_KEPT:
                self._skeletons.popitem(last=False)
            skeleton = emit_pruned(self.gm, plan, share=True)
            self._skeletons[key] = skeleton
            self.skeleton_builds += 1
        else:
            self._skeletons.move_to_end(key)
        return skeleton

"""The one state of the widths.

A pruner's sub-network is held in one place: the masks. Each group's
``ChannelMask`` holds its logits (which give the hard width n) and its rank
buffer (which channels are the top n). Everything else that depends on them is
a *view* computed from that state and cached by what it depends on:

* the widths: one batched device-to-host read of every mask's hard width (a
  tensor's shape is host data, so the physically sized hard branch needs them on
  the host), cached by the logits' version counters: while no logit changes (the
  settling phase, evaluation, a step that did not move the masks) no read at all;
* the *structure* of the hard network at those widths (:class:`Structure`):
  output shapes, rewritten arguments, which tensors are sliced on which axis and
  how many positions each keeps, and the skeleton graph emitted for them. It
  depends on the widths only (each class of a group appears equally often in a
  sliced axis, so the number of kept positions is fixed by the width), so it is
  built when a new widths tuple appears, never because the kept channels change;
* the kept positions of every sliced axis (:class:`KeepIndex`), computed on the
  device from the rank buffers each time the ranks change, with no host read;
* the full ``SurgeryPlan`` (structure plus the kept classes on the host), for
  ``export`` and the other consumers off the training step.

Nothing else stores widths, so the eval-mode network, the train-mode hard
branch, the masked oracle, the FLOPs and ``export()`` always describe the same
sub-network, whichever of them is called first and in whichever mode.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from s2h_fx.channels import GroupingResult
from s2h_fx.importance import keep_from_ranks
from s2h_fx.masks import ChannelMask
from s2h_fx.passes.emit_pruned import SkeletonEmitter
from s2h_fx.passes.plan_surgery import SurgeryPlan, kept_ids, plan_surgery

log = logging.getLogger(__name__)

# widths tuples whose structure (and skeleton) stay cached: a skeleton holds no
# tensor storage of its own (see emit_skeleton), so many are cheap
_STRUCTURES_KEPT = 64
Cuts = tuple[tuple[int, torch.Tensor], ...]


@dataclass(frozen=True, eq=False)
class Selection:
    """The sub-network the masks describe now: width and kept classes per group."""

    widths: dict[int, int]
    keep: dict[int, np.ndarray]

    def key(self) -> tuple[tuple[int, ...], bytes]:
        order = sorted(self.widths)
        return (tuple(self.widths[g] for g in order),
                b"".join(self.keep[g].astype(np.int64).tobytes() for g in order))


@dataclass(eq=False)
class Structure:
    """What the hard network at one widths tuple looks like, whichever classes are kept.

    ``plan`` was planned for the kept classes at the time it was built; its shapes
    and rewrites hold for every selection of these widths, its index tensors only
    for that one (the step uses :meth:`KeepIndex.cuts` instead). ``counts[s]``:
    kept positions of candidate slot ``s``; ``thresholds``: per layer of labels and
    position, the width of its group (0 where the position is always kept), on the
    device.
    """

    widths: tuple[int, ...]
    plan: SurgeryPlan
    counts: np.ndarray
    skeleton: fx.GraphModule | None = None
    thresholds: torch.Tensor | None = None


class KeepIndex:
    """Kept positions of every sliced axis, from the rank buffers, on the device.

    All candidate slots (parameter axes that carry a prunable channel) are laid end
    to end once: per position the global class index (into the concatenated rank
    buffers, or a sentinel of rank -1 for a channel no mask prunes) and its local
    position. A position is kept when its class's rank is below its group's width
    (in every layer of labels: with ``attention="both"`` a head's channel has its
    head's class and its width position's).
    The kept positions of slot ``s`` are, in order, entries ``[start_s, start_s +
    k_s)`` of the scatter of local positions to ``cumsum(kept) - 1``: ``k_s`` and
    ``start_s`` are host numbers of the structure, so no ``nonzero`` (a host read)
    is needed. About seven kernels per step, whatever the model's size.
    """

    def __init__(self, grouping: GroupingResult, order: list[int], sizes: dict[int, int]) -> None:
        offset, pos = {}, 0
        for g in order:
            offset[g], pos = pos, pos + sizes[g]
        self.sentinel = pos  # the appended rank -1 (always kept)
        prunable = np.zeros(len(grouping.groups) + 1, dtype=bool)
        prunable[order] = True
        self.slots: list[tuple[str, int]] = []
        self.irregular: set[int] = set()
        layers = grouping.layers()
        # per layer of labels (two with attention="both": a channel is kept when kept in
        # both), per position: its class and its group
        classes: list[list[np.ndarray]] = [[] for _ in layers]
        groups: list[list[np.ndarray]] = [[] for _ in layers]
        local = []
        for key, ids in grouping.slots.items():
            grps = [group_of[ids] for group_of, _ in layers]
            if not any(prunable[grp].any() for grp in grps):
                continue
            self.slots.append(key)
            for layer, ((_, class_of), grp) in enumerate(zip(layers, grps)):
                cls = np.full(ids.size, self.sentinel, dtype=np.int64)
                for g in np.unique(grp[prunable[grp]]).tolist():
                    here = grp == g
                    counts = np.bincount(class_of[ids[here]], minlength=sizes[g])
                    if counts.min() != counts.max():
                        self.irregular.add(g)
                    cls[here] = offset[g] + class_of[ids[here]]
                classes[layer].append(cls)
                groups[layer].append(np.where(prunable[grp], grp, -1))
            local.append(np.arange(ids.size))
        self.slot_of = {key: s for s, key in enumerate(self.slots)}
        self.group_of_position = np.stack([np.concatenate(g) if g else np.zeros(0, np.int64)
                                           for g in groups])  # (layers, positions)
        self._classes = torch.as_tensor(np.stack([np.concatenate(c) if c else
                                                  np.zeros(0, np.int64) for c in classes]),
                                        dtype=torch.long)
        self._local = torch.as_tensor(np.concatenate(local) if local else np.zeros(0),
                                      dtype=torch.long)
        self.order, self.num_groups = order, len(grouping.groups)
        if self.irregular:
            log.info("groups %s appear unevenly in a sliced axis: their kept classes are "
                     "part of the structure's key (a host read of their ranks)",
                     sorted(self.irregular))

    def thresholds(self, widths: dict[int, int], device: torch.device) -> torch.Tensor:
        """Per layer and position: its group's width (0 where always kept), once per
        structure."""
        table = np.zeros(self.num_groups, dtype=np.int64)
        for g, w in widths.items():
            table[g] = w
        thr = np.where(self.group_of_position >= 0,
                       table[np.maximum(self.group_of_position, 0)], 0)
        return torch.as_tensor(thr, dtype=torch.long).to(device)

    def cuts(self, structure: Structure, ranks: list[torch.Tensor]) -> dict[str, Cuts]:
        """Index tensors of the kept positions of every sliced tensor, on the device."""
        if not structure.plan.params:
            return {}
        device = ranks[0].device
        if self._classes.device != device:
            self._classes, self._local = self._classes.to(device), self._local.to(device)
        if structure.thresholds is None or structure.thresholds.device != device:
            widths = dict(zip(self.order, structure.widths))
            structure.thresholds = self.thresholds(widths, device)
        all_ranks = torch.cat([*ranks, ranks[0].new_full((1,), -1)])
        kept = (all_ranks[self._classes] < structure.thresholds).all(dim=0)
        total = int(structure.counts.sum())
        dest = torch.where(kept, torch.cumsum(kept, 0) - 1, total)
        out = self._local.new_empty(total + 1).scatter_(0, dest, self._local)
        starts = np.concatenate([[0], np.cumsum(structure.counts)])
        params: dict[str, Cuts] = {}
        for path, cuts in structure.plan.params.items():
            new = []
            for axis, _ in cuts:
                s = self.slot_of[(path, axis)]
                new.append((axis, out[int(starts[s]):int(starts[s + 1])]))
            params[path] = tuple(new)
        return params


class WidthState:
    """Reads the masks and keeps the views of them (structure, skeleton, indices) in step.

    Counters for tests and benchmarks: ``plan_builds`` (structures planned),
    ``skeleton_builds`` (graphs emitted), ``width_reads`` (batched host reads of
    the widths).
    """

    def __init__(self, gm: fx.GraphModule, grouping: GroupingResult,
                 masks: dict[int, ChannelMask]) -> None:
        self.gm, self.grouping, self.masks = gm, grouping, masks
        self.order = sorted(masks)
        self.index = KeepIndex(grouping, self.order, {g: m.size for g, m in masks.items()})
        self._structures: OrderedDict[tuple[object, ...], Structure] = OrderedDict()
        self._widths: tuple[tuple[object, ...], dict[int, int]] | None = None
        self._cuts: tuple[tuple[object, ...], dict[str, Cuts]] | None = None
        self._emitter: SkeletonEmitter | None = None  # made when first needed
        self.plan_builds = 0
        self.skeleton_builds = 0
        self.width_reads = 0

    # ---- the widths ------------------------------------------------------------
    def _logits_key(self) -> tuple[object, ...]:
        """Changes whenever a logit or a temperature may have changed (host data only:
        in-place updates bump a tensor's version counter)."""
        return tuple((id(m.logits), m.logits._version, m.logits.data_ptr(), m.temperature)
                     for m in (self.masks[g] for g in self.order))

    def widths(self) -> dict[int, int]:
        """Hard width n of every mask now: one batched host read, none while the
        logits are unchanged since the last one."""
        key = self._logits_key()
        if self._widths is None or self._widths[0] != key:
            with torch.no_grad():
                values = (torch.stack([self.masks[g].hard_width().detach() for g in self.order])
                          .round().tolist() if self.order else [])
            self.width_reads += 1
            self._widths = (key, {g: int(v) for g, v in zip(self.order, values)})
        return dict(self._widths[1])

    def ranks(self) -> dict[int, torch.Tensor]:
        return {g: m.rank for g, m in self.masks.items()}

    def selection(self) -> Selection:
        """Widths and kept classes on the host (a read of the ranks: not for the step)."""
        widths = self.widths()
        return Selection(widths, keep_from_ranks(self.ranks(), widths))

    # ---- the structure ------------------------------------------------------------
    def structure(self) -> Structure:
        """The structure of the hard network at the current widths (built once per
        widths tuple; the kept classes of unevenly laid out groups, if any, are part
        of the key)."""
        widths = self.widths()
        key: tuple[object, ...] = tuple(widths[g] for g in self.order)
        if self.index.irregular:
            keep = keep_from_ranks({g: self.masks[g].rank for g in self.index.irregular},
                                   {g: widths[g] for g in self.index.irregular})
            key += tuple(keep[g].tobytes() for g in sorted(keep))
        found = self._structures.get(key)
        if found is not None:
            self._structures.move_to_end(key)
            return found
        if len(self._structures) >= _STRUCTURES_KEPT:
            self._structures.popitem(last=False)
        keep = keep_from_ranks(self.ranks(), widths)  # the plan needs one selection
        plan = plan_surgery(self.gm, self.grouping, keep)
        kept = kept_ids(self.grouping, keep)
        counts = np.array([int(kept[self.grouping.slots[k]].sum()) for k in self.index.slots],
                          dtype=np.int64)
        structure = Structure(tuple(widths[g] for g in self.order), plan, counts)
        self._structures[key] = structure
        self.plan_builds += 1
        return structure

    def skeleton(self, structure: Structure) -> fx.GraphModule:
        """The emitted graph of ``structure`` with no tensors of its own (emitted once;
        see :class:`s2h_fx.passes.emit_pruned.SkeletonEmitter`)."""
        if structure.skeleton is None:
            if self._emitter is None:
                self._emitter = SkeletonEmitter(self.gm)
            structure.skeleton = self._emitter(structure.plan)
            self.skeleton_builds += 1
        return structure.skeleton

    def cuts(self, structure: Structure) -> dict[str, Cuts]:
        """Device index tensors of the kept positions of every sliced tensor now
        (recomputed when the ranks or the widths change; no host read)."""
        ranks = [self.masks[g].rank for g in self.order]
        key = (structure.widths, *((id(r), r._version, r.data_ptr()) for r in ranks))
        if self._cuts is None or self._cuts[0] != key:
            self._cuts = (key, self.index.cuts(structure, ranks) if ranks else {})
        return self._cuts[1]

    def plan(self) -> SurgeryPlan:
        """The surgery plan of the masks' sub-network: the structure's, with the kept
        classes now (a host read of the ranks) and the kept positions now."""
        structure = self.structure()
        sel = self.selection()
        return dataclasses.replace(structure.plan, keep=sel.keep,
                                   params=self.cuts(structure))

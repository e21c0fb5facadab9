"""Channel bookkeeping shared by the passes: layouts, spaces, reasons, node.meta keys.

Every channel that s2h-fx may prune gets a global integer *id*. A producer
(conv/linear/embedding output, or an axis of a bare parameter) opens a
*space*: a contiguous range of ids. A tensor's :class:`ChannelLayout` says, for
the axes that carry channels, which id sits at each position. Ops couple ids
(residual adds make two ids the same channel); the coupled ids form *classes*
and the spaces linked by them form *channel groups*.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

# node.meta keys owned by s2h-fx (values are frozen dataclasses or None).
S2H_LAYOUT = "s2h_layout"  # ChannelLayout | tuple[ChannelLayout | None, ...] | None
S2H_FLOPS = "s2h_flops"  # float: flop_counter FLOPs of this node on the example inputs
S2H_MASK_SITE = "s2h_mask_site"  # MaskSite: marks nodes inserted by insert_masks
S2H_VALUE = "s2h_value"  # int | float | tuple: a node's Python value on the example inputs


class SpaceKind(enum.Enum):
    PRODUCER = "producer"  # output channels of a conv / linear / embedding
    PARAMETER = "parameter"  # an axis of a parameter or buffer
    HEADS = "heads"  # one id per attention head, on an axis indexed by heads (the logits)


class FreezeReason(enum.Enum):
    UNKNOWN_OP = "op has no coupling rule"
    MODEL_OUTPUT = "reaches a model output"
    UNTRACKED_OPERAND = "combined element-wise with a tensor whose channels are not tracked"
    CHANNEL_REDUCTION = "reduced over the channel axis"
    CHANNEL_INDEXING = "indexed or strided on the channel axis"
    PARTIAL_USE = "only part of its channels are used somewhere (inside a block kept whole)"
    IRREGULAR_LAYOUT = "channel layout that a reshape/broadcast cannot follow"
    GROUPED_CONV = "grouped convolution with unequal in/out channels per group"
    NON_UNIFORM = "coupled channels do not pair up one-to-one"
    TOO_SMALL = "no smaller width is allowed by its divisor"
    SIZE_AS_VALUE = "its channel count is used as a value (not as the size of these channels)"
    WITHIN_BLOCK = ("multiplies or adds along channels that are kept whole (a head's width), "
                    "so it is never sliced")


@dataclass(frozen=True, eq=False)
class Factor:
    """Channel ids laid over one or more tensor axes (``ids.shape`` = sizes of ``axes``).

    ``tiled``: a channel axis split in several (a fused qkv output viewed as
    (3, heads, head_dim)) whose slices were coupled, so every ``ids[i, ..., :]``
    holds the same channels in the same order: one set of channels repeated along
    the leading dims of ``ids``. An op that treats those leading axes as batch
    axes (attention over heads) may then use the last dim alone (:meth:`untiled`).
    """

    axes: tuple[int, ...]
    ids: np.ndarray
    tiled: bool = False

    def untiled(self) -> Factor:
        """The repeated set of channels on the last axis of ``ids`` alone."""
        return Factor((self.axes[-1],), self.ids.reshape(-1, self.ids.shape[-1])[0])

    def __post_init__(self) -> None:
        if self.ids.ndim != len(self.axes):
            raise ValueError(f"factor over axes {self.axes} has ids of rank {self.ids.ndim}")


@dataclass(frozen=True, eq=False)
class ChannelLayout:
    """Which channel ids a tensor carries, and on which axes."""

    ndim: int
    factors: tuple[Factor, ...] = ()

    def factor_at(self, axis: int) -> Factor | None:
        for f in self.factors:
            if axis in f.axes:
                return f
        return None

    @property
    def labeled_axes(self) -> tuple[int, ...]:
        return tuple(sorted(a for f in self.factors for a in f.axes))

    def all_ids(self) -> np.ndarray:
        if not self.factors:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([f.ids.ravel() for f in self.factors])

    def __repr__(self) -> str:
        parts = ", ".join(f"axes={f.axes} n={f.ids.size}" for f in self.factors)
        return f"ChannelLayout(ndim={self.ndim}, {parts})"


@dataclass(frozen=True)
class ChannelSpace:
    index: int
    name: str
    size: int
    offset: int
    kind: SpaceKind


SlotKey = tuple[str, int]  # (qualified name of a parameter or buffer, axis)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together. ``size`` counts classes, not ids."""

    index: int
    size: int
    divisor: int
    atom: int  # classes kept or dropped together (grouped conv, norm groups)
    members: tuple[str, ...]  # parameter axes and producers, e.g. "conv1.weight[0]"
    producers: tuple[SlotKey, ...]
    frozen: tuple[str, ...] = ()  # reasons; empty when prunable

    @property
    def prunable(self) -> bool:
        return not self.frozen

    @property
    def candidate_widths(self) -> tuple[int, ...]:
        if self.frozen:
            return (self.size,)
        return tuple(range(self.divisor, self.size + 1, self.divisor))


@dataclass(frozen=True, eq=False)
class GroupingResult:
    """Read-only result of :func:`s2h_fx.passes.find_channel_groups`."""

    groups: tuple[ChannelGroup, ...]
    spaces: tuple[ChannelSpace, ...]
    slots: dict[SlotKey, np.ndarray]
    group_of_id: np.ndarray  # -1: not in a prunable group (always kept)
    class_of_id: np.ndarray  # class index inside its group, -1 outside
    unknown_ops: tuple[str, ...] = ()
    atom_of_class: tuple[np.ndarray, ...] = field(default=())  # per group
    attention: str = "width"  # what attention blocks prune: "width", "heads" or "both"
    # attention="both": a second label for the channels of a head that a head-width
    # group prunes too (channel d of head h: its head's group and class, and its width
    # position's group and class). Such a channel is kept when both its classes are.
    # Groups from ``inner_from`` on are those head-width groups (labelled here only).
    inner_group_of_id: np.ndarray | None = None
    inner_class_of_id: np.ndarray | None = None
    inner_from: int = -1

    def layers(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """(group_of_id, class_of_id) of each layer of labels: one, or two with
        ``attention="both"`` (a channel is kept when it is kept in every layer)."""
        if self.inner_group_of_id is None or self.inner_class_of_id is None:
            return ((self.group_of_id, self.class_of_id),)
        return ((self.group_of_id, self.class_of_id),
                (self.inner_group_of_id, self.inner_class_of_id))

    def labels(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """(group_of_id, class_of_id) of the layer that labels ``group``'s channels."""
        layers = self.layers()
        return layers[1] if len(layers) > 1 and group >= self.inner_from else layers[0]

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    @property
    def frozen(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if not g.prunable)

    def table(self, widths: dict[int, int] | None = None) -> str:
        rows = [("group", "channels", "width", "divisor", "status", "members")]
        for g in self.groups:
            w = str(widths.get(g.index, g.size)) if widths else str(g.size)
            status = "prunable" if g.prunable else "frozen: " + "; ".join(g.frozen)
            members = _abbreviate(g.members)
            rows.append((str(g.index), str(g.size), w, str(g.divisor), status, members))
        widths_col = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for r in rows:
            lines.append("  ".join(c.ljust(widths_col[i]) for i, c in enumerate(r[:5])) + "  " + r[5])
        head = (
            f"{len(self.prunable)} prunable and {len(self.frozen)} frozen channel groups"
        )
        if self.unknown_ops:
            head += "; ops without a rule: " + ", ".join(self.unknown_ops)
        if self.inner_group_of_id is not None:
            head += (f"; groups {self.inner_from} on are head widths inside whole heads (a "
                     "head's channel is kept when its head and its width position are)")
        return head + "\n" + "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _abbreviate(members: tuple[str, ...], limit: int = 6) -> str:
    if len(members) <= limit:
        return ", ".join(members)
    return ", ".join(members[:limit]) + f", ... (+{len(members) - limit})"

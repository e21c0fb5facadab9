"""Pass: the FLOPs of the network as a function of the groups' widths.

Reads: ``node.meta[S2H_FLOPS]`` (trace_model), ``node.meta[S2H_LAYOUT]`` and
``node.meta[S2H_FLOP_REFS]`` (find_channel_groups), and the GroupingResult.
Returns: a :class:`FlopsModel`; the graph is not changed.

Each node's FLOPs, as ``torch.utils.flop_counter`` counts them on the example
inputs, are scaled by the ratio of new to old size of the axes the node's rule
declared (output axes and the contracted axis); a rule may split a node's FLOPs
into parts that scale with different axes (attention's two products). An axis size is affine in the
widths, so the model is a sum of products of affine terms: exact for the
emitted graph and differentiable in the widths (the budget loss uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from s2h_fx.channels import S2H_FLOPS, S2H_LAYOUT, ChannelLayout, Factor, GroupingResult
from s2h_fx.passes.find_channel_groups import S2H_FLOP_REFS  # noqa: I001


@dataclass(frozen=True)
class AxisSize:
    """Size of one axis: ``full + sum(coef * (width[g] - size[g]))``."""

    full: float
    coefs: tuple[tuple[int, float], ...]

    def at(self, widths: dict[int, Any], sizes: dict[int, int]) -> Any:
        value: Any = self.full
        for g, c in self.coefs:
            value = value + c * (widths[g] - sizes[g])
        return value


@dataclass(frozen=True)
class FlopTerm:
    node: str
    base: float
    axes: tuple[AxisSize, ...]

    @property
    def groups(self) -> frozenset[int]:
        return frozenset(g for a in self.axes for g, _ in a.coefs)

    def at(self, widths: dict[int, Any], sizes: dict[int, int]) -> Any:
        value: Any = self.base
        for a in self.axes:
            value = value * (a.at(widths, sizes) / a.full)
        return value


@dataclass(frozen=True)
class FlopsModel:
    terms: tuple[FlopTerm, ...]
    constant: float  # FLOPs of nodes whose sizes do not depend on any width
    sizes: dict[int, int]  # full width of each prunable group

    @property
    def total(self) -> float:
        return self.constant + sum(t.base for t in self.terms)

    @property
    def scale(self) -> float:
        """The factor on the terms' sum (1: FLOPs and parameters are counted as they are)."""
        return 1.0

    def __call__(self, widths: dict[int, Any]) -> Any:
        """The cost at ``widths``: a float for numbers, a tensor (differentiable) for
        tensors. Tensors go through :class:`_Vectorised`: a handful of tensor ops
        whatever the number of terms (the term-by-term sum took ~1000 small ops on a
        ResNet-50, forward and backward, every training step)."""
        w = {**self.sizes, **widths}
        if self.terms and any(isinstance(v, torch.Tensor) for v in widths.values()):
            return self._vectorised()(w)
        value: Any = self.constant
        for t in self.terms:
            value = value + t.at(w, self.sizes)
        return value

    def _vectorised(self) -> _Vectorised:
        found = self.__dict__.get("_vectorised_form")
        if found is None:
            found = _Vectorised(self)
            object.__setattr__(self, "_vectorised_form", found)  # a cache on a frozen class
        return found

    def ratio(self, widths: dict[int, Any]) -> Any:
        return self(widths) / self.total


class _Vectorised:
    """A :class:`FlopsModel` as arrays: every distinct axis's relative size is
    ``r = 1 + M (w - s)`` (one row of ``M`` per axis: its coefficients over the axis's
    full size), a term is its base times the product of its axes' ``r`` (``index``:
    its axes, padded with a last entry fixed at 1), the cost the constant plus the
    terms' sum. The same arithmetic as the term-by-term sum, in the widths' dtype."""

    def __init__(self, model: FlopsModel) -> None:
        self.order = sorted(model.sizes)
        column = {g: i for i, g in enumerate(self.order)}
        rows: dict[AxisSize, int] = {}
        for t in model.terms:
            for a in t.axes:
                rows.setdefault(a, len(rows))
        coef = np.zeros((len(rows), len(self.order)))
        for a, r in rows.items():
            for g, c in a.coefs:
                coef[r, column[g]] += c / a.full
        arity = max(len(t.axes) for t in model.terms)
        index = np.full((len(model.terms), arity), len(rows), dtype=np.int64)
        for i, t in enumerate(model.terms):
            index[i, :len(t.axes)] = [rows[a] for a in t.axes]
        self.coef, self.index = coef, index
        self.base = np.array([t.base for t in model.terms])
        self.sizes = np.array([model.sizes[g] for g in self.order], dtype=np.float64)
        self.constant = model.constant
        self._on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def __call__(self, widths: dict[int, Any]) -> torch.Tensor:
        first = next(v for v in widths.values() if isinstance(v, torch.Tensor))
        dtype = first.dtype if first.is_floating_point() else torch.float32
        key = (first.device, dtype)
        if key not in self._on:
            self._on[key] = tuple(torch.as_tensor(a, dtype=dtype, device=first.device)
                                  for a in (self.coef, self.base, self.sizes))
            self._on[key] += (torch.as_tensor(self.index, device=first.device),)
        coef, base, sizes, index = self._on[key]
        w = torch.stack([torch.as_tensor(widths[g], dtype=dtype, device=first.device)
                         for g in self.order])
        # a broadcast product and a sum, not a matmul: autocast would run that in bfloat16
        r = 1 + (coef * (w - sizes)).sum(dim=1)
        r = torch.cat([r, r.new_ones(1)])
        return self.constant + (base * r[index].prod(dim=1)).sum()


def build_flops_model(gm: fx.GraphModule, grouping: GroupingResult) -> FlopsModel:
    sizes = {g.index: g.size for g in grouping.prunable}
    terms, constant = [], 0.0
    for node in gm.graph.nodes:
        base = float(node.meta.get(S2H_FLOPS, 0.0))
        if base == 0.0:
            continue
        parts = node.meta.get(S2H_FLOP_REFS)
        if parts is None:
            out = node.meta.get(S2H_LAYOUT)
            parts = ((1.0, _all_axes(out) if isinstance(out, ChannelLayout) else ()),)
        for share, refs in parts:
            axes = tuple(a for f, t in refs for a in ids_axis_sizes(f.ids, t, grouping, sizes)
                         if a.coefs)
            if axes:
                terms.append(FlopTerm(node.name, base * share, axes))
            else:
                constant += base * share
    return FlopsModel(tuple(terms), constant, sizes)


def _all_axes(lay: ChannelLayout) -> tuple[tuple[Factor, int], ...]:
    return tuple((f, t) for f in lay.factors for t in range(len(f.axes)))


def axis_extent(ids: np.ndarray, axis: int, kept: np.ndarray) -> int:
    """How many indices along ``axis`` of a factor still hold a kept channel."""
    return mask_extent(kept[ids], axis)


def mask_extent(mask: np.ndarray, axis: int) -> int:
    """How many indices along ``axis`` of a boolean array hold a True."""
    other = tuple(k for k in range(mask.ndim) if k != axis)
    return int(np.count_nonzero(mask.any(axis=other) if other else mask))


def slot_axis_size(ids: np.ndarray, grouping: GroupingResult,
                   sizes: dict[int, int]) -> tuple[AxisSize, ...]:
    """Size of a parameter's sliced axis (``grouping.slots`` ids) as widths change: the
    factors whose product it is (see :func:`ids_axis_sizes`)."""
    return ids_axis_sizes(ids.reshape(-1), 0, grouping, sizes)


def ids_axis_size(ids: np.ndarray, t: int, grouping: GroupingResult,
                  sizes: dict[int, int]) -> AxisSize:
    """Size of axis ``t`` of channel ids ``ids`` as the groups' widths change (one
    layer of labels: see :func:`ids_axis_sizes` for ``attention="both"``)."""
    return _layer_axis_size(ids, t, grouping, sizes, *grouping.layers()[0])


def ids_axis_sizes(ids: np.ndarray, t: int, grouping: GroupingResult,
                   sizes: dict[int, int]) -> tuple[AxisSize, ...]:
    """Size of axis ``t`` of channel ids ``ids`` as a product of affine factors, one per
    layer of labels that reaches them (``size = full * prod(factor / full)``). With
    ``attention="both"`` the channels of a head are kept when their head and their
    width position are: an axis over such channels scales with the heads kept times
    the width kept (exact where the channels form a full (head, position) grid, which
    find_channel_groups checks)."""
    out = tuple(a for lab in grouping.layers()
                for a in (_layer_axis_size(ids, t, grouping, sizes, *lab),) if a.coefs)
    return out or (AxisSize(float(ids.shape[t]), ()),)


def _layer_axis_size(ids: np.ndarray, t: int, grouping: GroupingResult, sizes: dict[int, int],
                     group_of: np.ndarray, class_of: np.ndarray) -> AxisSize:
    """The affine size through the two ends of each group's range of widths: all of it
    kept, and its smallest width (its first atoms, up to its divisor). Exact when each
    atom dropped takes the same number of indices off the axis; an index that does not
    depend on a group (the head width, as heads are dropped) gets no coefficient."""
    full = ids.shape[t]
    g_ids, c_ids = group_of[ids], class_of[ids]
    coefs = []
    for g in np.unique(g_ids[g_ids >= 0]).tolist():
        grp = grouping.groups[g]
        here = g_ids == g
        kept = ~here
        kept[here] = grouping.atom_of_class[g][c_ids[here]] < grp.divisor // grp.atom
        dropped = full - mask_extent(kept, t)
        if dropped:
            coefs.append((g, dropped / (sizes[g] - grp.divisor)))
    return AxisSize(float(full), tuple(coefs))

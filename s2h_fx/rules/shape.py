"""Rules for ops that move channels between axes or positions: permute,
reshape/view/flatten, cat/stack, split/chunk, and indexing."""

from __future__ import annotations

import builtins
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from s2h_fx.channels import S2H_LAYOUT, ChannelLayout, Factor, FreezeReason, SpaceKind
from s2h_fx.rules.base import LayoutValue, RuleContext, concrete, register_rule
from s2h_fx.rules.elementwise import block_within, join


def _permuted(lay: ChannelLayout, perm: list[int]) -> ChannelLayout:
    """Output axis k is input axis perm[k]."""
    return ChannelLayout(
        lay.ndim, tuple(Factor(tuple(perm.index(a) for a in f.axes), f.ids, f.tiled)
                        for f in lay.factors)
    )


@register_rule(torch.permute, "permute")
def permute(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    lay = ctx.layout(node.args[0])
    if lay is None:
        return ctx.blank(node)
    dims: Any = node.args[1:] if node.op == "call_method" else ctx.arg(node, 1, "dims")
    if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if dims is None:
        dims = node.kwargs["dims"]
    return _permuted(lay, [int(d) % lay.ndim for d in dims])


@register_rule(torch.transpose, torch.swapaxes, "transpose", "swapaxes", "t", torch.t)
def transpose(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    lay = ctx.layout(node.args[0])
    if lay is None:
        return ctx.blank(node)
    perm = list(range(lay.ndim))
    if len(node.args) >= 3:
        args: tuple[Any, ...] = node.args
        a, b = int(args[1]) % lay.ndim, int(args[2]) % lay.ndim
    else:
        a, b = 0, max(lay.ndim - 1, 0)
    perm[a], perm[b] = perm[b], perm[a]
    return _permuted(lay, perm)


_NAMED_FIELDS = {"values": 0, "indices": 1}  # max/min/sort/topk/... return (values, indices)


@register_rule(builtins.getattr)
def getattr_rule(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """``.T`` / ``.mT`` permute; ``.values`` / ``.indices`` of a named tuple of tensors
    are its parts. Any other attribute of a tuple whose parts carry channels freezes
    them (nothing would follow them further)."""
    src = node.args[0]
    val = src.meta.get(S2H_LAYOUT) if isinstance(src, fx.Node) else None
    if isinstance(val, tuple):
        k = _NAMED_FIELDS.get(str(node.args[1]))
        if k is not None and k < len(val):
            return val[k]
        ctx.freeze_layout(val, FreezeReason.IRREGULAR_LAYOUT, node)
        return ctx.blank(node)
    lay = ctx.layout(src)
    if lay is None or node.args[1] not in ("T", "mT"):
        return ctx.blank(node)
    perm = list(range(lay.ndim))
    if node.args[1] == "T":
        perm = perm[::-1]
    else:
        perm[-1], perm[-2] = perm[-2], perm[-1]
    return _permuted(lay, perm)


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source axes with runs of destination axes of equal element count."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) and j < len(dst):
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= src[i]
            else:
                j += 1
                gj.append(j)
                pj *= dst[j]
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    if groups:  # trailing size-1 axes join the last run
        groups[-1][0].extend(range(i, len(src)))
        groups[-1][1].extend(range(j, len(dst)))
    else:
        groups.append((list(range(len(src))), list(range(len(dst)))))
    return groups


@register_rule(
    torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as",
    nn.Flatten, nn.Unflatten,
)
def reshape(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    src = node.args[0]
    lay, shp, out_shape = ctx.layout(src), ctx.shape(src), ctx.shape(node)
    if lay is None or shp is None or out_shape is None:
        return ctx.blank(node)
    out: list[Factor] = []
    groups = reshape_groups(shp, out_shape)
    moved = _moved_axes(groups, shp, out_shape)
    spread = [f for f in lay.factors if len(f.axes) > 1 and all(a in moved for a in f.axes)]
    out.extend(Factor(tuple(moved[a] for a in f.axes), f.ids, f.tiled) for f in spread)
    across: list[Factor] = []
    for gi, gj in groups:
        inside = [f for f in lay.factors if set(f.axes) & set(gi) and f not in spread]
        if not inside:
            continue
        f = inside[0]
        if len(inside) == 1 and not set(f.axes) <= set(gi) and not f.tiled:
            if not any(g is f for g in across):  # once, whichever of its runs comes first
                across.append(f)
                moved_f = _reshape_across(ctx, lay, f, groups, shp, out_shape)
                if moved_f is None:
                    ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
                else:
                    out.append(moved_f)
            continue
        if len(inside) > 1 or not set(f.axes) <= set(gi):
            for g in inside:
                ctx.freeze(g.ids, FreezeReason.IRREGULAR_LAYOUT, node)
            continue
        out.extend(_reshape_factor(ctx, f, gi, gj, shp, out_shape))
    return ChannelLayout(len(out_shape), tuple(out))


def _reshape_across(
    ctx: RuleContext, lay: ChannelLayout, f: Factor, groups: list[tuple[list[int], list[int]]],
    shp: tuple[int, ...], out_shape: tuple[int, ...],
) -> Factor | None:
    """A factor over several axes (a head's (H, D), not tiled) whose axes fall in
    different runs of the reshape, each run reshaped on its own: interleaved RoPE's
    ``stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)`` merges (D/2, 2) into D
    under the heads. The ids are reshaped with the runs they lie in (the other runs
    held at size 1); the channels are then kept together along every axis that a run
    split or merged, so pruning only drops whole rows of the other axes and the
    reshape's sizes along those axes never change. None where another factor shares a
    run, or no axis would be left to prune along."""
    touched = [(gi, gj) for gi, gj in groups if set(gi) & set(f.axes)]
    if any(g is not f and set(g.axes) & set(gi) for g in lay.factors for gi, _ in touched):
        return None
    src_axes = {a for gi, _ in touched for a in gi}
    dst_axes = {b for _, gj in touched for b in gj}
    src = [shp[a] if a in src_axes else 1 for a in range(len(shp))]
    dst = [out_shape[b] if b in dst_axes else 1 for b in range(len(out_shape))]
    order = sorted(f.axes)
    ids = np.transpose(f.ids, [f.axes.index(a) for a in order])
    expand = [shp[a] if a in f.axes else 1 for a in range(len(shp))]
    arr = np.broadcast_to(ids.reshape(expand), src).reshape(dst)
    axes = [t for t in range(arr.ndim)
            if arr.shape[t] > 1 and not np.all(arr == arr.take([0], axis=t))]
    arr = np.ascontiguousarray(arr[tuple(slice(None) if t in axes else 0 for t in range(arr.ndim))])
    if arr.size != f.ids.size:  # a channel repeated by the reshape
        return None
    moved = Factor(tuple(axes), arr)
    reshaped = [b for gi, gj in touched
                if sum(shp[a] > 1 for a in gi) > 1 or sum(out_shape[b] > 1 for b in gj) > 1
                for b in gj if b in axes]
    return moved if block_within(ctx, moved, reshaped) else None


def _moved_axes(groups: list[tuple[list[int], list[int]]], shp: tuple[int, ...],
                out_shape: tuple[int, ...]) -> dict[int, int]:
    """Source axes that a reshape only moves (size-1 axes added or removed around them,
    as ``squeeze(0)`` does): source axis -> destination axis."""
    out = {}
    for gi, gj in groups:
        src, dst = [a for a in gi if shp[a] > 1], [b for b in gj if out_shape[b] > 1]
        if len(src) == 1 and len(dst) == 1:
            out[src[0]] = dst[0]
    return out


def _reshape_factor(
    ctx: RuleContext, f: Factor, gi: list[int], gj: list[int],
    shp: tuple[int, ...], out_shape: tuple[int, ...],
) -> list[Factor]:
    order = sorted(f.axes)
    ids = np.transpose(f.ids, [f.axes.index(a) for a in order])
    expand = [shp[a] if a in f.axes else 1 for a in gi]
    arr = np.broadcast_to(ids.reshape(expand), [shp[a] for a in gi])
    arr = arr.reshape([out_shape[b] for b in gj])
    axes = []
    for t in range(arr.ndim):
        if arr.shape[t] > 1 and not np.all(arr == arr.take([0], axis=t)):
            axes.append(t)
    arr = arr[tuple(slice(None) if t in axes else 0 for t in range(arr.ndim))]
    if arr.ndim > 1 and ctx.heads:
        _block_heads(ctx, arr)
        return [Factor(tuple(gj[t] for t in axes), np.ascontiguousarray(arr))]
    if arr.ndim > 1:
        # a channel axis split in several: keep the layout rectangular by making
        # every slice along the leading axes the same channels as the first one
        lead = arr.reshape(-1, arr.shape[-1])
        ctx.couple(lead[1:], np.broadcast_to(lead[0], lead[1:].shape))
        return [Factor(tuple(gj[t] for t in axes), np.ascontiguousarray(arr), tiled=True)]
    return [Factor(tuple(gj[t] for t in axes), np.ascontiguousarray(arr))] if axes else []


def _block_heads(ctx: RuleContext, ids: np.ndarray) -> None:
    """Whole-heads mode: a channel axis split in (..., H, D) keeps its slices apart, and
    head h (``ids[..., h, :]``: its D channels in every leading slice, e.g. its q, k and
    v rows) is kept or dropped whole. So the kept ids are always a rectangle
    (..., H', D) that the split's reshape can produce."""
    for column in np.moveaxis(ids, -2, 0).reshape(ids.shape[-2], -1):
        ctx.block(column)


def _cat_operands(ctx: RuleContext,
                  node: fx.Node) -> list[tuple[ChannelLayout | None, tuple[int, ...] | None]]:
    """(layout, shape) of each tensor joined: the list as written, or the parts of one
    node holding a tuple of tensors (``torch.cat(x.chunk(4, 1)[2:], 1)``)."""
    tensors = ctx.arg(node, 0, "tensors")
    out: list[tuple[ChannelLayout | None, tuple[int, ...] | None]] = []
    for t in list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]:
        val = t.meta.get(S2H_LAYOUT) if isinstance(t, fx.Node) else None
        metas = t.meta.get("tensor_meta") if isinstance(t, fx.Node) else None
        if isinstance(val, tuple) and isinstance(metas, (tuple, list)) and len(metas) == len(val):
            out += [(lay if isinstance(lay, ChannelLayout) else None,
                     tuple(int(d) for d in m.shape) if hasattr(m, "shape") else None)
                    for lay, m in zip(val, metas)]
        else:
            out.append((ctx.layout(t), ctx.shape(t)))
    return out


def _freeze_operands(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """An operand this rule cannot read (not a tensor, or a tuple without shapes): the
    channels of every operand are frozen, never dropped."""
    for a in node.all_input_nodes:
        ctx.freeze_layout(a.meta.get(S2H_LAYOUT), FreezeReason.IRREGULAR_LAYOUT, node)
    return ctx.blank(node)


@register_rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    out_shape = ctx.shape(node)
    if out_shape is None:
        return ctx.blank(node)
    nd = len(out_shape)
    dim = int(ctx.arg(node, 1, "dim", 0)) % nd
    pieces, rest = [], []
    for lay, shp in _cat_operands(ctx, node):
        if lay is None or shp is None:
            return _freeze_operands(ctx, node)
        f = lay.factor_at(dim)
        pieces.append((f, shp[dim]))
        others = tuple(g for g in lay.factors if dim not in g.axes)
        rest.append((ChannelLayout(len(shp), others), shp[:dim] + (1,) + shp[dim + 1 :]))
    joined = join(ctx, node, rest, out_shape[:dim] + (1,) + out_shape[dim + 1 :])
    if all(f is None for f, _ in pieces):
        return ChannelLayout(nd, joined)
    within = _cat_within(ctx, node, [f for f, _ in pieces], dim)
    if within is not None:
        return ChannelLayout(nd, joined + (within,))
    for f, _ in pieces:
        if f is not None and f.axes != (dim,):
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
    pieces = [(None if f is None or f.axes != (dim,) else f, size) for f, size in pieces]
    parts = []
    for f, size in pieces:
        if f is None:  # untracked positions get ids of their own, frozen
            f = Factor((dim,), ctx.new_space(f"{node.name}:untracked", size, SpaceKind.PARAMETER))
            ctx.freeze(f.ids, FreezeReason.UNTRACKED_OPERAND, node)
        parts.append(f.ids)
    return ChannelLayout(nd, joined + (Factor((dim,), np.concatenate(parts)),))


def _cat_within(ctx: RuleContext, node: fx.Node, factors: list[Factor | None],
                dim: int) -> Factor | None:
    """Pieces of a head's width joined again (rotate_half's ``cat([-x2, x1], -1)``):
    every piece split the same way (same axes, not tiled, the same sizes on the other
    axes); the joined ids are kept together along ``dim``, so the join keeps its sizes."""
    first = factors[0]
    if first is None or first.axes == (dim,) or first.tiled:
        return None
    k = first.axes.index(dim)
    rest = [s for t, s in enumerate(first.ids.shape) if t != k]
    for f in factors:
        if (f is None or f.axes != first.axes or f.tiled
                or [s for t, s in enumerate(f.ids.shape) if t != k] != rest):
            return None
    joined = Factor(first.axes, np.concatenate([f.ids for f in factors if f is not None], axis=k))
    return joined if block_within(ctx, joined, [dim]) else None


@register_rule(torch.stack)
def stack(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    out_shape = ctx.shape(node)
    if out_shape is None:
        return ctx.blank(node)
    dim = int(ctx.arg(node, 1, "dim", 0)) % len(out_shape)
    ops = []
    for lay, shp in _cat_operands(ctx, node):
        if lay is None or shp is None:
            return _freeze_operands(ctx, node)
        fs = tuple(Factor(tuple(a + (a >= dim) for a in f.axes), f.ids, f.tiled) for f in lay.factors)
        ops.append((ChannelLayout(len(out_shape), fs), shp[:dim] + (1,) + shp[dim:]))
    within = _stack_within(ctx, [lay for lay, _ in ops])
    if within is not None:
        rest = [(ChannelLayout(lay.ndim, tuple(g for g in lay.factors if g.axes != within.axes)),
                 shp) for lay, shp in ops]
        stacked = Factor(within.axes + (dim,), np.stack(
            [next(g for g in lay.factors if g.axes == within.axes).ids for lay, _ in ops], -1))
        if block_within(ctx, stacked, [dim]):
            return ChannelLayout(len(out_shape), join(ctx, node, rest, out_shape) + (stacked,))
    return ChannelLayout(len(out_shape), join(ctx, node, ops, out_shape))


def _stack_within(ctx: RuleContext, lays: list[ChannelLayout]) -> Factor | None:
    """Pieces of a head's width stacked on a new axis (interleaved RoPE's
    ``stack([-x[..., 1::2], x[..., ::2]], -1)`` over (H, D/2)): every operand has one
    factor over the same two or more axes (heads and width), not tiled, of the same
    shape; it is returned (the first operand's). The caller stacks their ids on the new
    axis and keeps them together along it, so the pieces stay paired and only whole
    rows of the other axes are dropped."""
    found = []
    for lay in lays:
        fs = [f for f in lay.factors if len(f.axes) > 1 and not f.tiled]
        found.append(fs[0] if len(fs) == 1 else None)
    first = found[0]
    if first is None or any(f is None or f.axes != first.axes or f.ids.shape != first.ids.shape
                            for f in found):
        return None
    return first


@register_rule(torch.split, torch.chunk, torch.tensor_split, torch.unbind,
               "split", "chunk", "tensor_split", "unbind")
def split(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    src = node.args[0]
    lay, shp = ctx.layout(src), ctx.shape(src)
    metas = node.meta.get("tensor_meta")
    if lay is None or shp is None or not isinstance(metas, (list, tuple)):
        return ctx.blank(node)
    name = getattr(node.target, "__name__", node.target)
    default = 0
    dim = ctx.arg(node, 1 if name == "unbind" else 2, "dim", default)
    dim = int(dim) % len(shp)
    f = lay.factor_at(dim)
    if name == "unbind" and f is not None and _leading(f, dim):
        return tuple(ChannelLayout(len(shp) - 1, tuple(
            _drop_axis(g, dim, s) if g is f else
            Factor(tuple(a - (a > dim) for a in g.axes), g.ids, g.tiled) for g in lay.factors))
            for s in range(shp[dim]))
    if (f is not None and name in ("split", "chunk", "tensor_split") and _leading(f, dim)
            and all(int(m.shape[dim]) == 1 for m in metas)):
        # qkv.chunk(3, dim) over the 3 of (3, H, D): each piece keeps its dim, of size 1
        return tuple(ChannelLayout(len(shp), tuple(
            _drop_axis(g, dim, s, renumber=False) if g is f else g for g in lay.factors))
            for s in range(len(metas)))
    if f is not None and f.axes != (dim,) and name != "unbind" and block_within(ctx, f, [dim]):
        # a head's width cut in pieces (RoPE's rotate_half: x.chunk(2, -1) over (H, D)):
        # the pieces keep their sizes, the heads are dropped in all of them alike
        k, at, cut = f.axes.index(dim), 0, []
        for m in metas:
            n = int(m.shape[dim])
            part = Factor(f.axes, np.take(f.ids, np.arange(at, at + n), axis=k))
            cut.append(ChannelLayout(len(shp), tuple(part if g is f else g for g in lay.factors)))
            at += n
        return tuple(cut)
    if f is not None and (f.axes != (dim,) or name == "tensor_split"):
        # tensor_split's indices are positions that surgery does not rewrite
        ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
        f = None
    others = tuple(g for g in lay.factors if dim not in g.axes)
    if f is not None and name in ("split", "chunk") and len(node.args) > 1:
        sizes = node.args[1]  # plan_surgery writes the pieces' new sizes as constants
        ctx.replaced_by_surgery(node, sizes if isinstance(sizes, (list, tuple)) else [sizes])
    outs: list[Any] = []
    start = 0
    for m in metas:
        if name == "unbind":
            if f is not None:
                ctx.freeze(f.ids[start : start + 1], FreezeReason.CHANNEL_INDEXING, node)
            fs = tuple(Factor(tuple(a - (a > dim) for a in g.axes), g.ids, g.tiled) for g in others)
            outs.append(ChannelLayout(len(shp) - 1, fs))
            start += 1
            continue
        size = int(m.shape[dim])
        piece = () if f is None else (Factor((dim,), f.ids[start : start + size]),)
        outs.append(ChannelLayout(len(shp), others + piece))
        start += size
    return tuple(outs)


def _leading(f: Factor, axis: int) -> bool:
    """``axis`` is a leading dim of a split channel axis, one that no pruning shortens:
    one of the repeated dims of a tiled factor, or, in whole-heads mode (not tiled), a
    dim before the heads (the 3 of a fused qkv's (3, H, D)), each of whose slices
    holds a row of every head (see ``_block_heads``)."""
    if axis not in f.axes or f.ids.ndim < 2:
        return False
    return f.axes.index(axis) < f.ids.ndim - (1 if f.tiled else 2)


def _drop_axis(f: Factor, axis: int, index: int, renumber: bool = True) -> Factor:
    """Slice ``index`` of a split factor along one of its leading axes, which goes away
    (the axes after it move down by one unless ``renumber`` is False)."""
    k = f.axes.index(axis)
    axes = tuple(a - (renumber and a > axis) for a in f.axes if a != axis)
    ids = np.take(f.ids, index, axis=k)
    return Factor(axes, ids, tiled=f.tiled and ids.ndim > 1)


@register_rule(operator.getitem)
def getitem(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    src, idx = node.args[0], node.args[1]
    val = src.meta.get("s2h_layout") if isinstance(src, fx.Node) else None
    if isinstance(val, tuple):  # a part, or a slice of the parts (``chunks[2:]``)
        at = concrete(idx)
        fixed = isinstance(at, int) or (isinstance(at, slice) and all(
            v is None or isinstance(v, int) for v in (at.start, at.stop, at.step)))
        return val[at] if fixed else _freeze_operands(ctx, node)
    lay, shp = ctx.layout(src), ctx.shape(src)
    if lay is None or shp is None:
        return ctx.blank(node)
    return index_layout(ctx, node, lay, shp, idx)


def index_layout(
    ctx: RuleContext, node: fx.Node, lay: ChannelLayout, shp: tuple[int, ...], idx: Any
) -> LayoutValue:
    raw = list(idx) if isinstance(idx, tuple) else [idx]
    items = [concrete(i) for i in raw]  # bounds taken from sizes: their example values
    _freeze_index_tensors(ctx, node, raw)
    if ctx.heads and _gathers_one_axis(ctx, items, len(shp)):
        return _gather(ctx, node, lay, items)
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) or _symbolic(i) for i in items):
        ctx.freeze_layout(lay, FreezeReason.CHANNEL_INDEXING, node)
        return ctx.blank(node)
    consumed = sum(isinstance(i, (int, slice)) for i in items)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(shp) - consumed))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (len(shp) - sum(isinstance(i, (int, slice)) for i in expanded)))
    mapping: dict[int, int] = {}
    out_axis = in_axis = 0
    dropped: set[int] = set()
    index_of: dict[int, int] = {}
    slices: dict[int, slice] = {}
    raw_of = _raw_items(raw, items, expanded)
    for i, r in zip(expanded, raw_of):
        if i is None:
            out_axis += 1
        elif isinstance(i, int):
            dropped.add(in_axis)
            index_of[in_axis] = i
            in_axis += 1
        else:
            mapping[in_axis] = out_axis
            slices[in_axis] = i
            if lay.factor_at(in_axis) is not None:  # plan_surgery rewrites these bounds
                ctx.replaced_by_surgery(node, [r])
            in_axis += 1
            out_axis += 1
    out = []
    for f in lay.factors:
        # qkv[0]: an integer index into a leading axis of a split factor takes one slice
        while set(f.axes) & dropped and _leading(f, min(set(f.axes) & dropped)):
            a = min(set(f.axes) & dropped)
            f = _drop_axis(f, a, index_of[a] % shp[a], renumber=False)  # input axes still
        if set(f.axes) & dropped:
            ctx.freeze(f.ids, FreezeReason.CHANNEL_INDEXING, node)
            continue
        sl = [slices[a] for a in f.axes]
        cut = [a for s, a in zip(sl, f.axes) if s.indices(shp[a]) != (0, shp[a], 1)]
        if cut and len(f.axes) > 1 and block_within(ctx, f, cut):
            # q[..., :D // 2] or x[..., 1::2] within each head: bounds that pruning never
            # moves, the heads dropped along the other axes
            out.append(Factor(tuple(mapping[a] for a in f.axes), f.ids[tuple(sl)]))
            continue
        if any(s.step not in (None, 1) for s in sl):
            ctx.freeze(f.ids, FreezeReason.CHANNEL_INDEXING, node)
            continue
        full = all(s.indices(shp[a])[:2] == (0, shp[a]) for s, a in zip(sl, f.axes))
        if not full and len(f.axes) > 1:
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
            continue
        out.append(Factor(tuple(mapping[a] for a in f.axes), f.ids[tuple(sl)], f.tiled and full))
    return ChannelLayout(out_axis, tuple(f for f in out if f.ids.size > 0))


def _freeze_index_tensors(ctx: RuleContext, node: fx.Node, raw: list[Any]) -> None:
    """Channels carried by an index tensor (``table[x.max(2).indices]``) are used as
    positions: frozen (no rule passes them on to the result)."""
    stack = list(raw)
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, fx.Node):
            ctx.freeze_layout(item.meta.get(S2H_LAYOUT), FreezeReason.CHANNEL_INDEXING, node)


def _gathers_one_axis(ctx: RuleContext, items: list[Any], ndim: int) -> bool:
    """``t[..., idx, ...]``: one integer index tensor, every other item a whole axis."""
    tensors = [i for i in items if isinstance(i, fx.Node)]
    dots = sum(i is Ellipsis for i in items)
    if len(tensors) != 1 or dots > 1 or len(items) - dots > ndim:
        return False
    meta = tensors[0].meta.get("tensor_meta")
    if getattr(meta, "dtype", None) not in (torch.int64, torch.int32):
        return False
    whole = slice(None)
    return all(i is Ellipsis or i is tensors[0] or (isinstance(i, slice) and i == whole)
               for i in items)


def _gather(ctx: RuleContext, node: fx.Node, lay: ChannelLayout, items: list[Any]) -> LayoutValue:
    """A relative position table gathered by a fixed index buffer (``table[index]``): the
    gathered axis is replaced by the index's axes (its channels, if any, are frozen);
    the other axes keep theirs (a per-head table's head axis)."""
    k = next(n for n, i in enumerate(items) if isinstance(i, fx.Node))
    if any(i is Ellipsis for i in items[:k]):
        k = lay.ndim - (len(items) - k)
    idx_nd = len(ctx.shape(items[k]) or ())
    out = []
    for f in lay.factors:
        if k in f.axes:
            ctx.freeze(f.ids, FreezeReason.CHANNEL_INDEXING, node)
            continue
        out.append(Factor(tuple(a + (idx_nd - 1) * (a > k) for a in f.axes), f.ids, f.tiled))
    return ChannelLayout(lay.ndim + idx_nd - 1, tuple(out))


def _symbolic(item: Any) -> bool:
    """A slice whose bounds are still graph values (no example value recorded)."""
    return isinstance(item, slice) and any(
        isinstance(v, fx.Node) for v in (item.start, item.stop, item.step))


def _raw_items(raw: list[Any], items: list[Any], expanded: list[Any]) -> list[Any]:
    """For each expanded index item, the item as written in the graph (None for filler)."""
    out: list[Any] = []
    for r, i in zip(raw, items):
        if i is Ellipsis:
            out.extend([None] * (len(expanded) - len(items) + 1))
        else:
            out.append(r)
    return out + [None] * (len(expanded) - len(out))


@register_rule("size", "dim", "numel", "nelement", torch.numel, builtins.len)
def metadata(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """Shape queries: no tensor flows out, so no channels either."""
    return ctx.blank(node)


@register_rule("expand", torch.broadcast_to)
def expand(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """Broadcast size-1 axes (a class token to the batch): channel axes keep their
    ids, shifted right when leading axes are added. A channel axis given by an
    explicit size (not -1) would keep the old width after pruning: frozen."""
    src = node.args[0]
    lay, shp, out_shape = ctx.layout(src), ctx.shape(src), ctx.shape(node)
    if lay is None or shp is None or out_shape is None:
        return ctx.blank(node)
    sizes: list[Any] = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    off = len(out_shape) - len(shp)
    out = []
    for f in lay.factors:
        if node.target != "expand" or any(sizes[a + off] != -1 for a in f.axes):
            ctx.freeze(f.ids, FreezeReason.SIZE_AS_VALUE, node)
            continue
        out.append(Factor(tuple(a + off for a in f.axes), f.ids, f.tiled))
    return ChannelLayout(len(out_shape), tuple(out))


@register_rule(torch.flip, "flip", torch.fliplr, torch.flipud, "fliplr", "flipud")
def flip(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """Reversing axes moves no channel to another axis: on a channel axis the ids are
    reversed with the values (the kept channels stay in reversed order), elsewhere they
    stay."""
    lay = ctx.layout(node.args[0])
    if lay is None or lay.ndim == 0:
        return ctx.blank(node)
    name = getattr(node.target, "__name__", node.target)
    if name in ("fliplr", "flipud"):
        dims: Any = [1] if name == "fliplr" else [0]
    else:
        dims = node.args[1:] if node.op == "call_method" else [ctx.arg(node, 1, "dims")]
        if node.op == "call_method" and not dims:
            dims = [node.kwargs["dims"]]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
    flipped = {int(d) % lay.ndim for d in dims}
    out = []
    for f in lay.factors:
        ids = f.ids
        for k, a in enumerate(f.axes):
            if a in flipped:
                ids = np.flip(ids, axis=k)
        out.append(Factor(f.axes, np.ascontiguousarray(ids), f.tiled))
    return ChannelLayout(lay.ndim, tuple(out))


@register_rule(torch.roll, "roll")
def roll(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """A cyclic shift along axes that hold no channels (Swin's shifted windows roll the
    feature map's height and width) leaves the channels where they are. Along a channel
    axis the shift would move other channels into place once some are pruned: those
    are frozen. Without ``dims`` the tensor is flattened first, and dims computed in the
    graph are not known here: everything freezes."""
    lay = ctx.layout(ctx.arg(node, 0, "input"))
    if lay is None:
        return ctx.blank(node)
    dims = ctx.arg(node, 2, "dims")
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not all(isinstance(d, int) for d in dims):  # none, or computed in the graph
        ctx.freeze_layout(lay, FreezeReason.IRREGULAR_LAYOUT, node)
        return ctx.blank(node)
    return ChannelLayout(lay.ndim, _off_axes(ctx, node, lay, {d % lay.ndim for d in dims}))


def _off_axes(ctx: RuleContext, node: fx.Node, lay: ChannelLayout,
              axes: set[int]) -> tuple[Factor, ...]:
    """The factors on none of ``axes`` (which an op moves values along); the others are
    frozen."""
    out = []
    for f in lay.factors:
        if axes & set(f.axes):
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
        else:
            out.append(f)
    return tuple(out)


@register_rule(torch.repeat_interleave, "repeat_interleave")
def repeat_interleave(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """``x.repeat_interleave(r, dim)`` along an axis without channels (GCViT repeats its
    global query over the windows on the batch axis) leaves the channels where they
    are. Along the head axis of channels split in (heads, head width) it repeats the
    heads (grouped-query attention's ``repeat_kv``): each repeated head is the same
    channels, so the rows are repeated (an ``output_size``, which would count the
    unpruned heads, is dropped: it only states the output's size). Along any other
    channel axis, or without ``dim`` (the tensor flattened), the channels are frozen."""
    lay = ctx.layout(ctx.arg(node, 0, "input"))
    out_shape = ctx.shape(node)
    if lay is None or out_shape is None:
        return ctx.blank(node)
    dim, repeats = ctx.arg(node, 2, "dim"), ctx.arg(node, 1, "repeats")
    if not isinstance(dim, int) or len(out_shape) != lay.ndim:
        ctx.freeze_layout(lay, FreezeReason.IRREGULAR_LAYOUT, node)
        return ctx.blank(node)
    dim %= lay.ndim
    out = []
    for f in lay.factors:
        if dim not in f.axes:
            out.append(f)
        elif (isinstance(repeats, int) and not isinstance(repeats, bool) and len(f.axes) > 1
              and f.axes.index(dim) < len(f.axes) - 1):
            out.append(Factor(f.axes, np.repeat(f.ids, repeats, axis=f.axes.index(dim)), f.tiled))
            if node.kwargs.get("output_size") is not None:  # a count of the heads: it would
                # not follow their pruning; a hint only (the output's size), so it goes
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "output_size"}
                ctx.graph_changed = True
        else:
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
    return ChannelLayout(lay.ndim, tuple(out))


@register_rule("unfold")
def unfold_windows(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """``x.unfold(dim, size, step)``: windows along ``dim`` (HaloNet cuts its key/value
    maps into blocks so): ``dim`` becomes the window count and a last axis of ``size``
    is added. Channels on other axes stay where they are; on ``dim`` they are frozen."""
    lay, out_shape = ctx.layout(node.args[0]), ctx.shape(node)
    dim = ctx.arg(node, 1, "dimension")
    if lay is None or out_shape is None:
        return ctx.blank(node)
    if not isinstance(dim, int):
        ctx.freeze_layout(lay, FreezeReason.IRREGULAR_LAYOUT, node)
        return ctx.blank(node)
    return ChannelLayout(len(out_shape), _off_axes(ctx, node, lay, {dim % max(lay.ndim, 1)}))


@register_rule(nn.Unfold, F.unfold)
def im2col(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """``F.unfold`` / ``nn.Unfold`` (im2col): (B, C, H, W) -> (B, C·k_h·k_w, L), channel c
    on the k_h·k_w rows from c·k_h·k_w on, as a flatten of (C, k_h·k_w) lays them (VOLO's
    outlook attention, TNT's pixel embedding): the rows follow the channel, and the
    arguments (kernel, dilation, padding, stride) hold no channel count. Channels on the
    spatial axes are frozen."""
    lay, shp, out_shape = ctx.layout(node.args[0]), ctx.shape(node.args[0]), ctx.shape(node)
    if lay is None or shp is None or out_shape is None:
        return ctx.blank(node)
    if len(shp) != 4 or len(out_shape) != 3 or out_shape[1] % shp[1]:
        ctx.freeze_layout(lay, FreezeReason.IRREGULAR_LAYOUT, node)
        return ctx.blank(node)
    out = []
    for f in lay.factors:
        if f.axes == (1,):
            out.append(Factor((1,), np.repeat(f.ids, out_shape[1] // shp[1])))
        else:
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
    return ChannelLayout(3, tuple(out))

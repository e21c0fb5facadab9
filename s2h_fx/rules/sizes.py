"""Channel counts that flow as Python values: ``c = x.size(1)`` then ``y.view(n, c, -1)``.

Sizes come from ``.size()``, ``.shape``, ``numel()``/``nelement()`` (the product of
every axis, so it depends on all the tensor's channels) and ``len()`` (axis 0), and
flow through arithmetic, indexing and concatenation of size tuples.

A size read from a channel axis changes when that axis is pruned. Where it is
used as the size of the same channels in a reshape, the graph adapts by itself;
used anywhere else (the size of other channels, a scale, a new tensor) it
would silently change meaning, so those channels are frozen. One exception: a
reshape size computed from other channels (or from none, on an axis that pruning
shortens), when it is the only such size and the reshape has no -1, is written as -1
(:func:`infer_foreign_size`).

``node.meta[S2H_SIZE_DEPS]``: for a node holding sizes, the channel ids its value
depends on (an array), or a tuple of those for a tuple of sizes; None otherwise.
"""

from __future__ import annotations

import builtins
import logging
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx

from s2h_fx.channels import ChannelLayout, Factor, FreezeReason
from s2h_fx.rules.base import RuleContext

S2H_SIZE_DEPS = "s2h_size_deps"

log = logging.getLogger(__name__)

_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
               operator.mod, operator.pow, operator.neg, builtins.int, builtins.max, builtins.min}
_RESHAPES = {"view", "reshape", torch.reshape}
_NUMEL = {torch.numel}


def _axis_ids(lay: ChannelLayout, axis: int) -> np.ndarray:
    f = lay.factor_at(axis)
    return f.ids.ravel() if f is not None else np.zeros(0, dtype=np.int64)


def _deps(arg: Any) -> Any:
    return arg.meta.get(S2H_SIZE_DEPS) if isinstance(arg, fx.Node) else None


def size_deps(ctx: RuleContext, node: fx.Node) -> Any:
    """The channel ids a size-valued node depends on (see module docstring)."""
    t = node.target
    if "tensor_meta" in node.meta:
        return None  # a tensor (``h * h.size(1)``): it uses the size, see check_size_uses
    if (node.op == "call_method" and t == "size") or (t is builtins.getattr
                                                       and node.args[1] == "shape"):
        lay, shp = ctx.layout(node.args[0]), ctx.shape(node.args[0])
        if lay is None or shp is None:
            return None
        per_axis = tuple(_axis_ids(lay, a) for a in range(len(shp)))
        dim = ctx.arg(node, 1, "dim") if node.op == "call_method" else None
        return per_axis if dim is None else per_axis[int(dim) % len(shp)]
    if t in _NUMEL or (node.op == "call_method" and t in ("numel", "nelement")):
        lay = ctx.layout(node.args[0])  # the product of every axis: all its channels
        return lay.all_ids() if lay is not None else None
    if t is builtins.len:
        return _len_deps(ctx, node.args[0])
    if t is operator.getitem and isinstance(_deps(node.args[0]), tuple):
        idx = node.args[1]
        if isinstance(idx, (int, slice)):
            return _deps(node.args[0])[idx]
        return None
    if t is operator.add and any(isinstance(_deps(a), tuple) for a in node.args[:2]):
        return _tuple_deps(node.args[0]) + _tuple_deps(node.args[1])  # torch.Size + tuple
    if node.op == "call_function" and t in _ARITHMETIC:
        parts = [d for a in node.args if isinstance(d := _deps(a), np.ndarray)]
        return np.concatenate(parts) if parts else None
    return None


def _len_deps(ctx: RuleContext, arg: Any) -> Any:
    """``len(t)``: the size of axis 0 of a tensor; of a size tuple, a constant."""
    lay, shp = ctx.layout(arg), ctx.shape(arg)
    if lay is None or shp is None or isinstance(_deps(arg), tuple):
        return None
    return _axis_ids(lay, 0) if len(shp) else None


def _tuple_deps(arg: Any) -> tuple[np.ndarray, ...]:
    deps = _deps(arg)
    if isinstance(deps, tuple):
        return deps
    n = len(arg) if isinstance(arg, (tuple, list)) else 1
    return tuple(np.zeros(0, dtype=np.int64) for _ in range(n))


def _size_args(node: fx.Node) -> list[Any]:
    """The size arguments of a reshape, one per output axis (arrays for a size tuple)."""
    if node.target not in _RESHAPES:
        return []
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    if len(rest) == 1 and isinstance(_deps(rest[0]), tuple):
        return list(_deps(rest[0]))  # x.view(y.shape)
    return list(rest)


def check_size_uses(ctx: RuleContext, node: fx.Node) -> None:
    """Record, for the group pass, every use of a channel count by this node."""
    if node.meta.get(S2H_SIZE_DEPS) is not None:
        return  # arithmetic on sizes: it propagates, it does not use
    out = node.meta.get("s2h_layout")
    if isinstance(out, ChannelLayout):
        infer_foreign_size(ctx, node, out)
    sizes = _size_args(node)
    source = _shape_source(ctx, node)
    for j, arg in enumerate(sizes):
        deps = arg if isinstance(arg, np.ndarray) else _deps(arg)
        if isinstance(deps, np.ndarray) and deps.size:
            f = out.factor_at(j) if isinstance(out, ChannelLayout) else None
            # channels split over several axes and pruned in whole rows (whole heads): a
            # count of them does not follow any one axis; kept as a use of the value,
            # unless it is the same axis of a tensor laid out alike (see _same_rows)
            factor = None if f is None or (len(f.axes) > 1 and not f.tiled) else f.ids.ravel()
            if factor is None and f is not None and source is not None:
                g = source.factor_at(j)
                factor = f.ids.ravel() if g is not None and _same_rows(f, g, j) else None
            ctx.size_checks.append((deps, factor, node))
    counted = {id(a) for a in sizes} | {id(a) for a in node.args[1:2] if _size_args(node)}
    for arg in _flat(node.args) + _flat(tuple(node.kwargs.values())):
        if id(arg) in counted or (isinstance(arg, fx.Node)
                                  and (node.name, arg.name) in ctx.constant_sizes):
            continue
        deps = _deps(arg)
        if isinstance(deps, np.ndarray) and deps.size:
            ctx.size_checks.append((deps, None, node))
        elif isinstance(deps, tuple):
            for d in deps:
                if d.size:
                    ctx.size_checks.append((d, None, node))


def _shape_source(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    """The layout of ``x`` in ``t.reshape(x.shape)`` / ``t.view(x.size())``: the whole
    shape of one tensor as the sizes; None otherwise."""
    rest = node.args[1:] if node.target in _RESHAPES else ()
    shape = rest[0] if len(rest) == 1 else None
    if not (isinstance(shape, fx.Node) and isinstance(_deps(shape), tuple)):
        return None
    src = _whole_shape_of(shape)
    lay = ctx.layout(src) if src is not None else None
    return lay if isinstance(lay, ChannelLayout) else None


def _whole_shape_of(node: Any) -> fx.Node | None:
    """The tensor whose whole shape ``node`` reads (``x.size()`` or ``x.shape``)."""
    if not isinstance(node, fx.Node) or len(node.args) < 1:
        return None
    if (node.op == "call_method" and node.target == "size" and len(node.args) == 1) or (
            node.target is builtins.getattr and node.args[1] == "shape"):
        src = node.args[0]
        return src if isinstance(src, fx.Node) else None
    return None


def _same_rows(f: Factor, g: Factor, axis: int) -> bool:
    """Whether axis ``axis`` of two factors over several axes (whole heads) has the
    same slices up to their order: each index along the axis holds one set of ids, and
    the two factors have the same sets (interleaved RoPE swaps channels inside each
    head, so its slices along the head width come in another order). Then whichever
    ids are kept, as many slices keep one in both, and the pruned sizes agree."""
    if len(g.axes) < 2 or g.tiled or axis not in f.axes or axis not in g.axes:
        return False

    def rows(h: Factor) -> list[tuple[int, ...]]:
        ids = np.moveaxis(h.ids, h.axes.index(axis), 0)
        return sorted(tuple(np.unique(r).tolist()) for r in ids.reshape(ids.shape[0], -1))

    return f.ids.shape[f.axes.index(axis)] == g.ids.shape[g.axes.index(axis)] and rows(f) == rows(g)


def _flat(args: Any) -> list[Any]:
    out: list[Any] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flat(a))
        elif isinstance(a, slice):
            out.extend(_flat((a.start, a.stop, a.step)))
        elif isinstance(a, dict):
            out.extend(_flat(tuple(a.values())))
        else:
            out.append(a)
    return out


def _explicit_sizes(node: fx.Node) -> tuple[list[Any], Callable[[list[Any]], None]] | None:
    """A reshape's size arguments as written (not ``x.view(y.shape)``), and a setter that
    writes new ones back in the same form; None for other nodes."""
    if node.target not in _RESHAPES or len(node.args) < 2:
        return None
    rest: tuple[Any, ...] = tuple(node.args[1:])
    packed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
    sizes = list(rest[0]) if packed else list(rest)
    if not packed and len(sizes) == 1 and isinstance(_deps(sizes[0]), tuple):
        return None

    def write(new: list[Any]) -> None:
        node.args = (node.args[0], tuple(new)) if packed else (node.args[0], *new)

    return sizes, write


def _sizes_itself(out: ChannelLayout, axis: int, deps: np.ndarray) -> bool:
    """A size that counts exactly the channels on ``axis``, and ``axis`` alone holds
    them: it follows the pruned axis by itself. A count of channels spread over several
    axes (a channel axis split into (groups, per group), as whole heads keep it) does
    not: pruning whole rows changes the row count, not the row length."""
    f = out.factor_at(axis)
    if f is None or f.axes != (axis,):
        return False
    return bool(np.isin(deps, f.ids).all() and np.isin(f.ids, deps).all())


def _narrows(ctx: RuleContext, out: ChannelLayout, axis: int) -> bool:
    """Whether pruning may shorten ``axis`` of a reshape's output: it carries channels
    that are not all frozen, and is not a repeated row of a tiled factor (the heads of
    a head-width split, which every head keeps)."""
    f = out.factor_at(axis)
    if f is None or ctx.all_frozen(f.ids):
        return False
    return not (f.tiled and axis != f.axes[-1])


def _plain_count(ctx: RuleContext, size: Any) -> np.ndarray | None:
    """The ids of a channel axis whose size ``size`` reads directly (``x.shape[k]``,
    ``x.size(k)``, or a name unpacked from ``x.shape``), where that axis holds one plain
    factor: the count is then exactly those channels, one per position."""
    if not isinstance(size, fx.Node):
        return None
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2:
        src, axis = size.args
    elif size.target is operator.getitem and isinstance(size.args[1], int):
        src, axis = _whole_shape_of(size.args[0]), size.args[1]
        if src is None:
            return None
    else:
        return None
    lay, shp = ctx.layout(src), ctx.shape(src)
    if not isinstance(lay, ChannelLayout) or shp is None or not isinstance(axis, int):
        return None
    f = lay.factor_at(axis % len(shp))
    return f.ids if f is not None and f.axes == (axis % len(shp),) and not f.tiled else None


def _tie_count(ctx: RuleContext, node: fx.Node, out: ChannelLayout, j: int, size: Any) -> None:
    """A reshape that already has its -1 elsewhere sizes axis ``j`` by the channel count
    of another tensor (PVTv2's and Twins' spatial reduction: ``sr(x).reshape(B, C, -1)``
    with ``C`` the block input's width, ``sr`` a conv of its own). Where that count is
    one plain channel axis and axis ``j`` holds one plain factor of as many channels,
    the two are tied position by position: kept or dropped together, so their widths
    stay equal and the size stays right on any pruned graph (an extra constraint, never
    a wrong result). Otherwise the size check freezes both."""
    src, f = _plain_count(ctx, size), out.factor_at(j)
    if src is None or f is None or f.axes != (j,) or f.tiled or src.shape != f.ids.shape:
        return
    ctx.couple(src, f.ids)
    log.info("%s: size %d is the channel count of another tensor; its channels and "
             "those of axis %d are tied", node.name, j, j)


def infer_foreign_size(ctx: RuleContext, node: fx.Node, out: ChannelLayout) -> None:
    """``qkv.reshape(B, N, 3, H, C // H)`` with ``C`` the channel count of the block's
    *input*: the size of one group of channels (the embedding's) gives the size of
    another (the head width). Pruned, the two no longer agree, and the reshape would
    fail (or mix channels). When exactly one size of a reshape is computed from channels
    other than those of the axis it sizes (and not all frozen already: frozen counts
    never change), and no size is -1 yet, it is the one size the others leave free: the
    rule writes -1 there, which is the same reshape on the unpruned graph and the right
    one on any pruned graph; the channels it read are then not used as a value (timm's
    NesT; what Torch-Pruning asks its users to patch by hand). A size computed from no
    channels at all on an axis that pruning shortens (``reshape(b * H, n, D)`` at batch
    1, where the axis holds the heads) is foreign too: -1 where it is the only one, else
    that axis's channels are frozen (nothing else would follow them)."""
    found = _explicit_sizes(node)
    if found is None:
        return
    sizes, write = found
    foreign, blind = [], []
    for j, s in enumerate(sizes):
        deps = _deps(s)
        if not isinstance(deps, np.ndarray) or not deps.size:
            if isinstance(s, fx.Node) and _narrows(ctx, out, j):
                blind.append(j)  # computed from no channels (``b * H``), on an axis that narrows
            continue
        if _sizes_itself(out, j, deps) or ctx.all_frozen(deps):
            continue  # the axis's own channels, or frozen ones: the size stays right
        foreign.append(j)
    if any(isinstance(s, int) and s == -1 for s in sizes) or len(foreign) + len(blind) != 1:
        for j in foreign:
            _tie_count(ctx, node, out, j, sizes[j])
        for j in blind:  # nothing would follow the pruned axis: keep its channels
            f = out.factor_at(j)
            ctx.freeze(f.ids if f is not None else np.zeros(0, np.int64),
                       FreezeReason.SIZE_AS_VALUE, node)
        return
    j = (foreign + blind)[0]
    write([-1 if k == j else s for k, s in enumerate(sizes)])
    ctx.graph_changed = True
    log.info("%s: size %d read from other channels, written as -1", node.name, j)

"""Pass 5a: plan the emission of the pruned graph (nothing is changed).

Reads: ``node.meta[S2H_LAYOUT]`` and the GroupingResult, plus the classes to keep
in each prunable group. Returns a printable :class:`SurgeryPlan`:
  * ``params``: for each parameter/buffer, the indices kept on each sliced axis;
  * ``shapes``: each node's output shape in the pruned graph;
  * ``rewrites``: node arguments that hold channel counts (view/reshape sizes,
    split sizes, slice bounds, layer_norm shapes) and their new values.
Argument rewrites are a registry like the coupling rules: one entry per function,
method name or module type (:func:`register_rewrite`), so an op of the user's that
carries a channel count in its arguments gets its rewrite beside its rule and its
module surgery (:func:`s2h_fx.register_op` registers all three).
Precondition: every kept set is a sorted selection of whole atoms.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from s2h_fx.channels import S2H_LAYOUT, S2H_MASK_SITE, ChannelLayout, GroupingResult
from s2h_fx.errors import InvariantError
from s2h_fx.passes.build_flops_model import axis_extent  # noqa: I001
from s2h_fx.rules.base import add_to_registry, concrete, iter_layouts, lookup_in_registry
from s2h_fx.rules.layers import RMS_NORM_FUNCTIONS

# (args, kwargs) of the node in the pruned graph, or (args, kwargs, new target)
RewriteResult = Union[  # noqa: UP007 (runtime alias, py3.10)
    tuple[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any], Any]]
Rewrite = Callable[[fx.Node, "RewriteContext"], Union[RewriteResult, None]]  # noqa: UP007
MODULE_REWRITES: dict[type, Rewrite] = {}
FUNCTION_REWRITES: dict[Any, Rewrite] = {}
METHOD_REWRITES: dict[str, Rewrite] = {}


def register_rewrite(*targets: Any) -> Callable[[Rewrite], Rewrite]:
    """Register an argument rewrite for functions, method names or module types: when
    channels are removed, ``fn(node, ctx)`` returns the node's new ``(args, kwargs)``
    (or ``(args, kwargs, target)``), or None to keep them. ``ctx`` is a
    :class:`RewriteContext`.

    >>> @register_rewrite(my_view)
    ... def my_view_sizes(node, ctx):
    ...     return (node.args[0], list(ctx.shape(node))), dict(node.kwargs)
    """

    def deco(fn: Rewrite) -> Rewrite:
        add_to_registry(targets, fn, MODULE_REWRITES, FUNCTION_REWRITES, METHOD_REWRITES)
        return fn

    return deco


@dataclass(frozen=True)
class RewriteContext:
    """What an argument rewrite sees of the pruned graph."""

    shapes: dict[str, tuple[int, ...]]  # node name -> its output shape after pruning
    kept: np.ndarray  # channel id -> kept?

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        """The pruned shape of a node's (tensor) output; None if it is not tracked."""
        return self.shapes.get(arg.name) if isinstance(arg, fx.Node) else None

    def kept_count(self, ids: np.ndarray) -> int:
        """How many of these channel ids survive."""
        return int(self.kept[ids].sum())


@dataclass(frozen=True, eq=False)
class SurgeryPlan:
    widths: dict[int, int]
    keep: dict[int, np.ndarray]  # group -> kept class indices (sorted)
    params: dict[str, tuple[tuple[int, torch.Tensor], ...]]  # path -> ((axis, index), ...)
    shapes: dict[str, tuple[int, ...]]
    # node name -> (target, args, kwargs) of the node in the pruned graph
    rewrites: dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"SurgeryPlan: {len(self.widths)} groups, {len(self.params)} sliced tensors, "
                 f"{len(self.rewrites)} rewritten nodes"]
        for g, w in sorted(self.widths.items()):
            lines.append(f"  group {g}: keep {w} channels")
        for path, cuts in sorted(self.params.items()):
            dims = ", ".join(f"axis {a}: {len(i)}" for a, i in cuts)
            lines.append(f"  slice {path} ({dims})")
        for name, (target, args, _) in self.rewrites.items():
            lines.append(f"  rewrite {name}: {getattr(target, '__name__', target)}{args[1:]}")
        return "\n".join(lines)


def kept_ids(grouping: GroupingResult, keep: dict[int, np.ndarray]) -> np.ndarray:
    """Per channel id: kept or not. Ids outside prunable groups are kept; ids of a
    prunable group are kept when their class is in ``keep`` (none, for a group that
    ``keep`` leaves out), and, with ``attention="both"``, their head-width class too.
    One pass over the ids per layer of labels, whatever the number of groups."""
    offset = np.full(len(grouping.groups) + 1, -1, dtype=np.int64)  # last: not in keep
    sizes = [grouping.groups[g].size for g in keep]
    offset[list(keep)] = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes else []
    selected = np.zeros(sum(sizes) + 1, dtype=bool)  # last entry: a group left out
    for g, classes in keep.items():
        selected[offset[g] + np.asarray(classes, dtype=np.int64)] = True
    kept = np.ones(len(grouping.group_of_id), dtype=bool)
    for gid, cid in grouping.layers():
        inside = gid >= 0
        start = offset[gid[inside]]
        kept[inside] &= selected[np.where(start >= 0, start + cid[inside], -1)]
    return kept


def plan_surgery(
    gm: fx.GraphModule, grouping: GroupingResult, keep: dict[int, np.ndarray]
) -> SurgeryPlan:
    for g, classes in keep.items():
        grp = grouping.groups[g]
        if not grp.prunable or len(classes) == 0 or len(classes) > grp.size:
            raise InvariantError(f"group {g}: cannot keep {len(classes)} of {grp.size} channels")
        picked = np.asarray(classes)
        if picked.min() < 0 or picked.max() >= grp.size:
            raise InvariantError(f"group {g}: class indices must be in [0, {grp.size}); got "
                                 f"{int(picked.min())}..{int(picked.max())}")
    kept = kept_ids(grouping, keep)
    params: dict[str, tuple[tuple[int, torch.Tensor], ...]] = {}
    for (path, axis), ids in grouping.slots.items():
        sel = kept[ids]
        if not sel.all():
            cut = (axis, torch.as_tensor(np.flatnonzero(sel), dtype=torch.long))
            params[path] = params.get(path, ()) + (cut,)
    shapes = {}
    for node in gm.graph.nodes:
        lay = node.meta.get(S2H_LAYOUT)
        tm = node.meta.get("tensor_meta")
        if isinstance(lay, ChannelLayout) and hasattr(tm, "shape"):
            shapes[node.name] = _new_shape(tuple(tm.shape), lay, kept)
    rewrites = {}
    ctx = RewriteContext(shapes, kept)
    for node in gm.graph.nodes:
        if S2H_MASK_SITE in node.meta or node.op not in ("call_function", "call_method",
                                                          "call_module"):
            continue
        rewrite = lookup_in_registry(gm, node, MODULE_REWRITES, FUNCTION_REWRITES,
                                     METHOD_REWRITES)
        new = rewrite(node, ctx) if rewrite is not None else None
        if new is not None and new != (node.args, dict(node.kwargs)):
            target = new[2] if len(new) == 3 else node.target
            rewrites[node.name] = (target, new[0], new[1])
    widths = {g: len(c) for g, c in keep.items()}
    return SurgeryPlan(widths, {g: np.asarray(c) for g, c in keep.items()}, params, shapes,
                       rewrites)


def _new_shape(shape: tuple[int, ...], lay: ChannelLayout, kept: np.ndarray) -> tuple[int, ...]:
    out = list(shape)
    for f in lay.factors:
        for t, a in enumerate(f.axes):
            out[a] = axis_extent(f.ids, t, kept)
    return tuple(out)


@register_rewrite("view", "reshape", torch.reshape)
def _reshape(node: fx.Node, ctx: RewriteContext) -> RewriteResult | None:
    """Sizes become the pruned output's (-1 stays -1)."""
    args: tuple[Any, ...] = tuple(node.args)
    kwargs, out = dict(node.kwargs), ctx.shape(node)
    if out is None:
        return None
    if node.op == "call_function":
        return (args[0], _sizes(args[1], out)), kwargs
    packed = len(args) == 2 and isinstance(args[1], (list, tuple))
    new = _sizes(args[1] if packed else args[1:], out)
    return ((args[0], new) if packed else (args[0], *new)), kwargs


@register_rewrite(F.conv1d, F.conv2d, F.conv3d)
def _conv_groups(node: fx.Node, ctx: RewriteContext) -> RewriteResult | None:
    """A functional grouped conv's ``groups`` (a constant: timm's anti-aliasing blur
    ``F.conv2d(x, filt, groups=C)``) follows its pruned input: the input's channels
    over the weight's input channels per group."""
    args: tuple[Any, ...] = tuple(node.args)
    kwargs = dict(node.kwargs)
    groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    src, w = ctx.shape(args[0]), ctx.shape(weight)
    if not isinstance(groups, int) or groups == 1 or src is None or w is None:
        return None
    new = src[1] // w[1]
    if new == groups:
        return None
    if len(args) > 6:
        return (*args[:6], new, *args[7:]), kwargs
    return args, {**kwargs, "groups": new}


@register_rewrite(F.layer_norm, *RMS_NORM_FUNCTIONS)
def _layer_norm(node: fx.Node, ctx: RewriteContext) -> RewriteResult | None:
    args: tuple[Any, ...] = tuple(node.args)
    kwargs = dict(node.kwargs)
    src = ctx.shape(args[0])
    shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
    if src is None or shape is None:
        return None
    new = list(src[-(len(shape) if isinstance(shape, (list, tuple)) else 1):])
    if len(args) > 1:
        return (args[0], new, *args[2:]), kwargs
    return args, {**kwargs, "normalized_shape": new}


@register_rewrite(F.group_norm)
def _group_norm(node: fx.Node, ctx: RewriteContext) -> RewriteResult | None:
    args: tuple[Any, ...] = tuple(node.args)
    kwargs = dict(node.kwargs)
    src, tm = ctx.shape(args[0]), args[0].meta.get("tensor_meta")
    groups = args[1] if len(args) > 1 else kwargs.get("num_groups")
    if src is None or tm is None or groups is None:
        return None
    # whole groups were dropped; one group stays one (its channels pruned one by one)
    num_groups = 1 if int(groups) == 1 else int(groups) * src[1] // int(tm.shape[1])  # type: ignore[arg-type]
    if len(args) > 1:
        return (args[0], num_groups, *args[2:]), kwargs
    return args, {**kwargs, "num_groups": num_groups}


def _sizes(sizes: Any, out: tuple[int, ...]) -> list[Any]:
    """Integer sizes become the pruned output's; -1 and graph values stay (a size of
    other channels was written as -1 by the sizes rule, see ``infer_foreign_size``)."""
    if not isinstance(sizes, (list, tuple)):
        return sizes  # x.view(y.shape): follows y
    return [out[k] if isinstance(s, int) and s != -1 else s for k, s in enumerate(sizes)]


@register_rewrite("split", "chunk", torch.split, torch.chunk)
def _split(node: fx.Node, ctx: RewriteContext) -> RewriteResult | None:
    """split/chunk on a channel axis becomes split with the pieces' new sizes."""
    args: tuple[Any, ...] = tuple(node.args)
    kwargs: dict[str, Any] = dict(node.kwargs)
    kept = ctx.kept
    outs = node.meta.get(S2H_LAYOUT)
    metas = node.meta.get("tensor_meta")
    if not isinstance(outs, tuple) or not isinstance(metas, (list, tuple)):
        return None
    ndim = len(metas[0].shape)
    dim = int(args[2] if len(args) > 2 else kwargs.pop("dim", 0)) % ndim
    sizes, channels = [], False
    for lay, m in zip(outs, metas):
        f = lay.factor_at(dim) if isinstance(lay, ChannelLayout) else None
        sizes.append(int(m.shape[dim]) if f is None else axis_extent(f.ids, f.axes.index(dim), kept))
        channels |= f is not None
    computed = channels and len(args) > 1 and _has_node(args[1])  # sizes computed in the graph
    if sizes == [int(m.shape[dim]) for m in metas] and not computed:
        return None
    target = "split" if node.op == "call_method" else torch.split
    return (args[0], sizes, dim), {k: v for k, v in kwargs.items() if k != "dim"}, target


def _has_node(value: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


@register_rewrite(operator.getitem)
def _slice(node: fx.Node, ctx: RewriteContext) -> RewriteResult | None:
    """Slice bounds on a channel axis count kept channels."""
    args: tuple[Any, ...] = tuple(node.args)
    kwargs, kept = dict(node.kwargs), ctx.kept
    if not isinstance(args[0], fx.Node):
        return None
    lay = args[0].meta.get(S2H_LAYOUT)
    if not isinstance(lay, ChannelLayout) or not lay.factors:
        return None
    idx = args[1] if isinstance(args[1], tuple) else (args[1],)
    values = [concrete(i) for i in idx]
    if Ellipsis in values or any(not isinstance(i, (slice, int, type(None))) for i in values):
        return None
    axis, new = 0, []
    for i, v in zip(idx, values):
        f = lay.factor_at(axis) if v is not None else None
        if isinstance(v, slice) and f is not None and f.axes == (axis,):
            # bounds on a channel axis become constants: the kept channels before them
            prefix = np.concatenate([[0], np.cumsum(kept[f.ids])])
            start, stop, _ = v.indices(f.ids.size)
            i = slice(int(prefix[start]), int(prefix[stop]), v.step)
        new.append(i)
        axis += v is not None
    return (args[0], tuple(new) if isinstance(args[1], tuple) else new[0]), kwargs


def node_layouts(node: fx.Node) -> list[ChannelLayout]:
    return list(iter_layouts(node.meta.get(S2H_LAYOUT)))

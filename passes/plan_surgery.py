"""Pass 5a: plan the emission of the pruned graph (nothing is changed).

Reads: ``node.meta[S2H_LAYOUT]`` and the GroupingResult, plus the classes to keep
in each prunable group. Returns a printable :class:`SurgeryPlan`:
  * ``params``: for each parameter/buffer, the indices kept on each sliced axis;
  * ``shapes``: each node's output shape in the pruned graph;
  * ``rewrites``: node arguments that hold channel counts (view/reshape sizes,
    split sizes, slice bounds, layer_norm shapes) and their new values.
Precondition: every kept set is a sorted selection of whole atoms.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from s2h_fx.channels import S2H_LAYOUT, S2H_MASK_SITE, ChannelLayout, GroupingResult
from s2h_fx.errors import InvariantError
from s2h_fx.passes.build_flops_model import axis_extent  # noqa: I001
from s2h_fx.rules.base import concrete, iter_layouts


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
    kept = grouping.group_of_id < 0
    for g, classes in keep.items():
        sel = np.zeros(grouping.groups[g].size, dtype=bool)
        sel[classes] = True
        in_g = grouping.group_of_id == g
        kept[in_g] = sel[grouping.class_of_id[in_g]]
    return kept


def plan_surgery(
    gm: fx.GraphModule, grouping: GroupingResult, keep: dict[int, np.ndarray]
) -> SurgeryPlan:
    for g, classes in keep.items():
        grp = grouping.groups[g]
        if not grp.prunable or len(classes) == 0 or len(classes) > grp.size:
            raise InvariantError(f"group {g}: cannot keep {len(classes)} of {grp.size} channels")
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
    for node in gm.graph.nodes:
        if S2H_MASK_SITE in node.meta:
            continue
        new = _rewrite(node, shapes, kept)
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


def _shape_of(arg: Any, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    return shapes.get(arg.name) if isinstance(arg, fx.Node) else None


def _rewrite(
    node: fx.Node, shapes: dict[str, tuple[int, ...]], kept: np.ndarray
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    args: tuple[Any, ...]
    t, args, kwargs = node.target, tuple(node.args), dict(node.kwargs)
    out = shapes.get(node.name)
    if node.op == "call_method" and t in ("view", "reshape") and out is not None:
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        new = _sizes(sizes, out, 0)
        return ((args[0], new) if len(args) == 2 and isinstance(args[1], (list, tuple))
                else (args[0], *new)), kwargs
    if node.op == "call_function" and t is torch.reshape and out is not None:
        return (args[0], _sizes(args[1], out, 0)), kwargs
    if t in ("split", "chunk", torch.split, torch.chunk):
        return _split(node, args, kwargs, kept)
    if t is operator.getitem and isinstance(args[0], fx.Node):
        return _slice(node, args, kwargs, kept)
    if t is F.layer_norm:
        src = _shape_of(args[0], shapes)
        n = len(args[1]) if isinstance(args[1], (list, tuple)) else 1
        if src is not None:
            return (args[0], list(src[-n:]), *args[2:]), kwargs
    if t is F.group_norm:
        src, tm = _shape_of(args[0], shapes), args[0].meta.get("tensor_meta")
        groups = args[1] if len(args) > 1 else kwargs.get("num_groups")
        if src is not None and tm is not None and groups is not None:
            num_groups = int(groups) * src[1] // int(tm.shape[1])  # type: ignore[arg-type]
            if len(args) > 1:
                return (args[0], num_groups, *args[2:]), kwargs
            return args, {**kwargs, "num_groups": num_groups}
    return None


def _sizes(sizes: Any, out: tuple[int, ...], start: int) -> list[Any]:
    return [s if not isinstance(s, int) or s == -1 else out[start + k] for k, s in enumerate(sizes)]


def _split(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], kept: np.ndarray) -> Any:
    """split/chunk on a channel axis becomes split with the pieces' new sizes."""
    outs = node.meta.get(S2H_LAYOUT)
    metas = node.meta.get("tensor_meta")
    if not isinstance(outs, tuple) or not isinstance(metas, (list, tuple)):
        return None
    ndim = len(metas[0].shape)
    dim = int(args[2] if len(args) > 2 else kwargs.pop("dim", 0)) % ndim
    sizes, channels = [], False
    for lay, m in zip(outs, metas):
        f = lay.factor_at(dim) if isinstance(lay, ChannelLayout) else None
        sizes.append(int(m.shape[dim]) if f is None else int(kept[f.ids].sum()))
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


def _slice(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], kept: np.ndarray) -> Any:
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

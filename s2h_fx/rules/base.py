"""The coupling-rule registry and the context that rules write into.

A *rule* says how one op moves channel ids from its inputs to its output and
which ids it couples. Rules are looked up by module type (``call_module``),
by function (``call_function``) or by method name (``call_method``). Users add
rules for their own layers with :func:`register_rule`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any, Union

import numpy as np
import torch
from torch import fx, nn

from s2h_fx.channels import (
    S2H_LAYOUT,
    S2H_VALUE,
    ChannelLayout,
    ChannelSpace,
    Factor,
    FreezeReason,
    SlotKey,
    SpaceKind,
)

log = logging.getLogger(__name__)

LayoutValue = Union[ChannelLayout, tuple[Any, ...], None]  # noqa: UP007 (runtime alias, py3.10)
Rule = Callable[["RuleContext", fx.Node], LayoutValue]

MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def register_rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a coupling rule for module types, functions or method names.

    >>> @register_rule(MyLayer)
    ... def my_layer(ctx, node): ...

    A function may also be named by its qualified name, ``"package.module.function"``
    (a dotted string, never a method name): the rule then needs no import of that
    package, and applies to the function autowrapped into any graph.
    """

    def deco(fn: Rule) -> Rule:
        add_to_registry(targets, fn, MODULE_RULES, FUNCTION_RULES, METHOD_RULES)
        return fn

    return deco


def lookup_rule(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    return lookup_in_registry(gm, node, MODULE_RULES, FUNCTION_RULES, METHOD_RULES)


def add_to_registry(targets: Iterable[Any], fn: Any, modules: dict[type, Any],
                    functions: dict[Any, Any], methods: dict[str, Any]) -> None:
    """File ``fn`` under each target: a method name (str), a function's qualified name
    (a dotted str, filed with the functions), a module type or a function."""
    for t in targets:
        if isinstance(t, str) and "." in t:
            functions[t] = fn
        elif isinstance(t, str):
            methods[t] = fn
        elif isinstance(t, type) and issubclass(t, nn.Module):
            modules[t] = fn
        else:
            functions[t] = fn


def lookup_in_registry(gm: fx.GraphModule, node: fx.Node, modules: dict[type, Any],
                       functions: dict[Any, Any], methods: dict[str, Any]) -> Any:
    """The entry for a node's target: a module's nearest registered class (its MRO), a
    function, or a method name; None when there is none."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        for cls in type(mod).__mro__:
            if cls in modules:
                return modules[cls]
        return None
    if node.op == "call_function":
        try:
            found = functions.get(node.target)
        except TypeError:  # unhashable target
            found = None
        return found if found is not None else functions.get(qualified_name(node.target))
    if node.op == "call_method":
        return methods.get(str(node.target))
    return None


def qualified_name(fn: Any) -> str:
    """``module.qualname`` of a function ("" when it has none)."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{name}" if module and name else ""


def describe(node: fx.Node) -> str:
    """Short human name of a node and its target, for reasons and errors."""
    tgt = node.target
    name = getattr(tgt, "__name__", None) or str(tgt)
    if node.op == "call_module":
        leaf = node.meta.get("s2h_trace_leaf")  # the tracer made it a leaf: say why
        why = f"; {str(leaf).splitlines()[0][:160]}" if leaf else ""
        return f"{node.name} (module {tgt}{why})"
    if node.op == "call_method":
        return f"{node.name} (.{name}())"
    return f"{node.name} ({name})"


class RuleContext:
    """Mutable state of one channel-dependency analysis (owned by the pass)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.spaces: list[ChannelSpace] = []
        self.num_ids = 0
        self.slots: dict[SlotKey, np.ndarray] = {}
        self.producers: list[SlotKey] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.blocks: list[np.ndarray] = []  # each array: ids kept or dropped together
        self.unknown: list[str] = []
        # node -> its FLOPs' parts: (share of the node's FLOPs, the (factor, axis) pairs
        # that part scales with)
        self.flop_refs: dict[str, tuple[tuple[float, tuple[tuple[Factor, int], ...]], ...]] = {}
        # node -> (arg, axis) pairs (or arg indices) whose channels it sums over
        self.mixing: dict[str, tuple[int | tuple[int, int], ...]] = {}
        # (ids a size value depends on, ids of the axis it sizes or None, the using node)
        self.size_checks: list[tuple[np.ndarray, np.ndarray | None, fx.Node]] = []
        # (node, size node): a channel count the surgery replaces by a constant (slice bounds
        # and split sizes on a channel axis), so it is not a use of the count as a value
        self.constant_sizes: set[tuple[str, str]] = set()
        # coupled id pairs (a[i], b[i]); their connected components are the classes
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        # a rule rewrote a node's arguments (SDPA's scale made explicit): recompile after
        self.graph_changed = False
        # grouped convs that keep their groups and prune inside each (see rules.layers)
        self.tied_groups: frozenset[str] = frozenset()
        # attention="heads": a channel axis split in (..., H, D) keeps its slices apart and
        # each head's channels form a block (rules.shape), attention couples per head
        # (rules.layers); head_rows maps the id that stands for head h on an axis indexed
        # by heads (attention logits) to that head's contracted channel ids
        self.heads = False
        self.head_rows: dict[int, np.ndarray] = {}
        self._head_ids: dict[bytes, np.ndarray] = {}
        # attention="both": the heads are analysed to prune their width too (rules.heads
        # then declares the FLOPs of attention on the head width as well)
        self.head_widths = False
        # a tensor reachable by several paths (tied weights) has one set of ids, kept
        # under the path named_parameters() reports it by (its first)
        self.canonical = tensor_aliases(gm)
        self._frozen_mask = np.zeros(0, dtype=bool)  # cache of all_frozen
        self._frozen_seen = 0

    # ---- reading the graph -------------------------------------------------
    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def layout(self, arg: Any) -> ChannelLayout | None:
        """Layout of a tensor argument; None for non-tensors."""
        if isinstance(arg, fx.Node):
            val = arg.meta.get(S2H_LAYOUT)
            return val if isinstance(val, ChannelLayout) else None
        return None

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        if not isinstance(arg, fx.Node):
            return None
        tm = arg.meta.get("tensor_meta")
        shp = getattr(tm, "shape", None)
        return tuple(int(s) for s in shp) if shp is not None else None

    def blank(self, node: fx.Node) -> LayoutValue:
        """A layout with no channel labels matching the node's output structure."""
        return _blank(node.meta.get("tensor_meta"))

    def arg(self, node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    # ---- writing ---------------------------------------------------------
    def new_space(self, name: str, size: int, kind: SpaceKind) -> np.ndarray:
        space = ChannelSpace(len(self.spaces), name, size, self.num_ids, kind)
        self.spaces.append(space)
        self.num_ids += size
        return np.arange(space.offset, space.offset + size, dtype=np.int64)

    def param_ids(self, path: str, axis: int, producer: bool = False) -> np.ndarray:
        """Ids of one axis of a parameter or buffer; created on first use. Tied tensors
        (one tensor under several paths) share their ids."""
        path = self.canonical.get(path, path)
        key = (path, axis)
        if key not in self.slots:
            tensor = _get_attr(self.gm, path)
            kind = SpaceKind.PRODUCER if producer else SpaceKind.PARAMETER
            self.slots[key] = self.new_space(f"{path}[{axis}]", int(tensor.shape[axis]), kind)
        if producer and key not in self.producers:
            self.producers.append(key)
        return self.slots[key]

    def head_ids(self, rows: np.ndarray) -> np.ndarray:
        """Ids that stand for the heads of channels split in heads (``rows``: (H, D)) on
        an axis indexed by heads (the attention logits' head axis): one per head, each
        the same channel as the first of its head's row (a head is kept or dropped
        whole), in a space of their own, so that they carry the head and nothing else
        (not the first position of a head's width, which ``attention="both"`` prunes
        too). The same rows get the same ids."""
        key = rows[:, 0].tobytes()
        ids = self._head_ids.get(key)
        if ids is None:
            ids = self.new_space(f"heads of id {int(rows[0, 0])}", rows.shape[0],
                                 SpaceKind.HEADS)
            self.couple(ids, rows[:, 0])
            self._head_ids[key] = ids
            self.head_rows.update(zip(ids.tolist(), rows))
        return ids

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        """Make ``a[i]`` and ``b[i]`` the same channel, position by position."""
        if a.shape != b.shape:
            raise ValueError(f"cannot couple ids of shapes {a.shape} and {b.shape}")
        self.edges.append((a.ravel(), b.ravel()))

    def freeze(self, ids: np.ndarray, reason: FreezeReason, node: fx.Node | None) -> None:
        if ids.size == 0:
            return
        where = f" at {describe(node)}" if node is not None else ""
        self.frozen.append((ids.ravel(), reason.value + where))

    def freeze_layout(self, layout: LayoutValue, reason: FreezeReason, node: fx.Node) -> None:
        for lay in iter_layouts(layout):
            self.freeze(lay.all_ids(), reason, node)

    def all_frozen(self, ids: np.ndarray) -> bool:
        """Whether every id is frozen already (frozen ids stay frozen: their group too)."""
        if self._frozen_seen < len(self.frozen) or self._frozen_mask.size < self.num_ids:
            mask = np.zeros(self.num_ids, dtype=bool)
            mask[: self._frozen_mask.size] = self._frozen_mask
            for frozen_ids, _ in self.frozen[self._frozen_seen :]:
                mask[frozen_ids] = True
            self._frozen_mask, self._frozen_seen = mask, len(self.frozen)
        return bool(self._frozen_mask[ids].all())

    def block(self, ids: np.ndarray) -> None:
        """The given ids are kept or dropped as one unit."""
        if ids.size > 1:
            self.blocks.append(ids.ravel())

    def replaced_by_surgery(self, node: fx.Node, args: Iterable[Any]) -> None:
        """These size-valued args of ``node`` become constants in the pruned graph."""
        for a in args:
            for v in (a.start, a.stop, a.step) if isinstance(a, slice) else (a,):
                if isinstance(v, fx.Node):
                    self.constant_sizes.add((node.name, v.name))

    def mixes(self, node: fx.Node, *sites: int | tuple[int, int]) -> None:
        """Declare where the node sums over channels (its mask sites): ``(arg, axis)`` for
        one contracted axis of an argument, or a bare arg index for all its channel axes.

        Declare each contracted channel once: in ``a @ b`` the channels of ``a``'s last
        axis and ``b``'s axis -2 are the same channels, and masking both operands
        would scale every product by the mask twice (m squared)."""
        self.mixing[node.name] = sites

    def flops(self, node: fx.Node, refs: Iterable[tuple[ChannelLayout | None, int]]) -> None:
        """Declare that the node's FLOPs scale with the sizes of these (layout, axis) pairs."""
        self.flop_parts(node, [(1.0, refs)])

    def flop_parts(self, node: fx.Node,
                   parts: Iterable[tuple[float, Iterable[tuple[ChannelLayout | None, int]]]]) -> None:
        """Declare the node's FLOPs as a sum of parts, each a share of what the FLOP
        counter counts at full width that scales with its own (layout, axis) pairs
        (attention: q.kᵀ with the query width, attn.v with the value width)."""
        out = []
        for share, refs in parts:
            pairs = []
            for lay, axis in refs:
                f = lay.factor_at(axis) if lay is not None else None
                if f is not None:
                    pairs.append((f, f.axes.index(axis)))
            out.append((float(share), tuple(pairs)))
        self.flop_refs[node.name] = tuple(out)


def tensor_aliases(module: nn.Module) -> dict[str, str]:
    """Path -> first path of the same tensor, for every parameter or buffer that is
    reachable by more than one path (tied weights); the first is the path
    ``named_parameters()`` / ``named_buffers()`` keep."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for named in (module.named_parameters(remove_duplicate=False),
                  module.named_buffers(remove_duplicate=False)):
        for path, t in named:
            if id(t) in first:
                out[path] = first[id(t)]
            else:
                first[id(t)] = path
    return out


def concrete(arg: Any) -> Any:
    """The value of ``arg`` on the example inputs: itself, or a node's recorded Python value
    (sizes, counts); slices get concrete bounds. A node without a recorded value stays."""
    if isinstance(arg, fx.Node):
        return arg.meta.get(S2H_VALUE, arg)
    if isinstance(arg, slice):
        return slice(concrete(arg.start), concrete(arg.stop), concrete(arg.step))
    return arg


def _get_attr(gm: nn.Module, path: str) -> torch.Tensor:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _blank(meta: Any) -> LayoutValue:
    if meta is None:
        return None
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return ChannelLayout(len(meta.shape))
    if isinstance(meta, (list, tuple)):
        return tuple(_blank(m) for m in meta)
    if isinstance(meta, dict):
        return tuple(_blank(m) for m in meta.values())
    return None


def iter_layouts(value: Any) -> Iterable[ChannelLayout]:
    """All ChannelLayouts inside a (nested) layout value."""
    if isinstance(value, ChannelLayout):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from iter_layouts(v)


def node_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in itertools.chain(node.all_input_nodes)]

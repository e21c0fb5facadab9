"""Tracing through control flow on sizes: proxies that carry the example's values.

torch.fx records a model's ops by running its ``forward`` on proxies; a proxy has no
value, so Python control flow on one (``if H % window:``, ``range(n)``, ``len(x)``)
stops the trace. Most such branches in vision models depend only on sizes (padding
to a window, a shortcut taken when the feature map already fits), which the example
inputs fix. :class:`ValuedTracer` runs each op on the example's values as it records
it (the model runs once, op by op), so a branch on a size is taken as it is on the
example inputs, and the decision is kept in the graph as a guard:
``torch._assert(cond)`` (or ``int(size) == value`` where a size became a Python int).
A graph run on inputs whose sizes would take another branch stops with that guard's
message instead of computing something else. Sizes used as sizes stay graph values,
so the batch size is free wherever the code computes with it.

A branch on a tensor's *data* (``if x.max() > 0:``, ``.item()`` and what is computed
from it) is not decided: tracing stops as torch.fx's does, and the tracer's fallback
makes that submodule a leaf. A tensor built from sizes and constants alone
(``torch.ones(B, N, dtype=bool)``, ``arange``, ``zeros_like(x)``, the model's
buffers, and ops on such tensors only; no input, parameter or random op in its
history) holds the same values for every input of these sizes: a branch on it
(``if mask.any():``) is decided and guarded like one on a size (a buffer changed
later then stops the graph at the guard instead of taking another branch).
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
from torch import fx, nn
from torch.fx.proxy import Attribute
from torch.utils._pytree import tree_leaves

# where a Python value counts as a size: these read a tensor's shape (or its device,
# dtype), not its data
_SIZE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device",
                           "is_floating_point", "is_complex", "element_size"})
_SIZE_ATTRIBUTES = frozenset({"shape", "ndim", "device", "dtype", "layout", "is_cuda"})
# ops whose output's *shape* depends on the input's data
_DATA_SHAPED = frozenset({
    torch.nonzero, torch.masked_select, torch.unique, torch.unique_consecutive,
    torch.argwhere, torch.repeat_interleave, "nonzero", "masked_select", "unique",
    "unique_consecutive", "argwhere", "repeat_interleave"})
GUARD_MESSAGE = "s2h-fx traced this model for the sizes of its example inputs"
# tensors of values fixed by sizes and constants: where a size-derived tensor starts
_FACTORIES = frozenset({
    torch.ones, torch.zeros, torch.full, torch.arange, torch.eye, torch.linspace,
    torch.logspace, torch.tensor, torch.as_tensor})
_LIKE = frozenset({torch.ones_like, torch.zeros_like, torch.full_like,
                   "new_ones", "new_zeros", "new_full"})
# name parts of ops whose values are random or uninitialised: never size-derived
_NOT_FIXED = ("rand", "bernoulli", "dropout", "normal", "multinomial", "empty", "poisson",
              "exponential", "uniform", "cauchy", "geometric")


def _tensor_like(value: Any) -> bool:
    """A tensor, or a tuple/list of tensors (unbind, split, chunk)."""
    if isinstance(value, torch.Tensor):
        return True
    return (isinstance(value, (tuple, list)) and bool(value)
            and all(isinstance(v, torch.Tensor) for v in value))


def _has_tensor(values: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in tree_leaves(values))


class ValuedProxy(fx.Proxy):
    """A proxy whose tracer knows the value it stands for on the example inputs."""

    tracer: ValuedTracer  # type: ignore[assignment]

    def __getattr__(self, k: str) -> ValuedAttribute:
        return ValuedAttribute(self, k)

    def _size_value(self, what: str) -> Any:
        """The value, where it is a Python number computed from sizes only; else the
        TraceError torch.fx raises for ``what``."""
        value = self.tracer.value_of(self)
        if (isinstance(value, torch.Tensor) and value.numel() == 1
                and self.node in self.tracer.fixed):
            value = value.item()  # a tensor of values fixed by the sizes
        if isinstance(value, (bool, int)) and not self.tracer.is_data(self):
            return value
        raise _data_error(what)

    def __bool__(self) -> bool:
        value = bool(self._size_value("bool"))
        self.tracer.guard(self if value else self.tracer.create_proxy(
            "call_function", operator.not_, (self,), {}))
        return value

    def __index__(self) -> int:
        value = int(self._size_value("an integer"))
        self.tracer.guard(self.tracer.create_proxy("call_function", operator.eq, (self, value), {}))
        return value

    __int__ = __index__

    def __len__(self) -> int:
        """A shape's length (the tensor's rank: fixed by the graph); the length of a
        list or tuple of tensors (unbind, split: a size) or of a tensor's first axis,
        guarded to its value; refused where it comes from data."""
        value = self.tracer.value_of(self)
        if self.tracer.is_data(self):
            raise _data_error("the length")
        if isinstance(value, torch.Size):
            return len(value)
        if isinstance(value, (tuple, list)):
            n = self.tracer.create_proxy("call_function", len, (self,), {})
            return int(n)  # guarded
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(self.size(0))  # type: ignore[call-overload]
        return super().__len__()

    def __iter__(self) -> Any:
        value = self.tracer.value_of(self)
        if isinstance(value, (tuple, list, torch.Size)) or (
                isinstance(value, torch.Tensor) and value.dim() > 0):
            return iter([self[i] for i in range(len(self))])  # type: ignore[index]
        return super().__iter__()


_FACTORY_NAMES = ("ones", "zeros", "full", "empty", "arange", "eye", "linspace", "logspace",
                  "rand", "randn", "randint")


def _recorded(fn: Any) -> Any:
    """``fn`` that, called with a proxy among its arguments (a size in a tuple too),
    records a call of ``fn`` on the proxy's tracer instead."""
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)
    return factory


def _data_error(what: str) -> fx.proxy.TraceError:
    return fx.proxy.TraceError(
        f"symbolically traced variables cannot be used as inputs to control flow "
        f"({what} of a value computed from a tensor's data)")


class ValuedAttribute(ValuedProxy, Attribute):
    """``proxy.attr`` (a method to call, or a value such as ``shape``), valued."""


class ValuedTracer:
    """Mixin for a torch.fx tracer: every node's value on ``example_inputs`` is computed
    as it is created (``values``), and Python control flow on a size is decided by it
    and guarded. Must precede ``fx.Tracer`` in the bases."""

    def init_values(self, example_inputs: tuple[Any, ...]) -> None:
        self.example = list(example_inputs)
        self.values: dict[fx.Node, Any] = {}
        self.data: set[fx.Node] = set()  # Python values computed from a tensor's data
        self.data_shaped: set[fx.Node] = set()  # tensors whose shape depends on data
        self.fixed: set[fx.Node] = set()  # tensors whose values the sizes fix
        self._fixed_ok = True  # until an in-place op may write data into one
        self.guards: list[str] = []
        self._placeholders = 0
        self._params: list[inspect.Parameter] = []
        self.concrete_args: dict[str, Any] = {}
        self._running = False

    # ---- proxies -------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValuedProxy(node, self)  # type: ignore[arg-type]

    def value_of(self, p: fx.Proxy) -> Any:
        node = p.node
        if node not in self.values:
            raise fx.proxy.TraceError(f"no example value for {node.format_node()}")
        return self.values[node]

    def is_data(self, p: fx.Proxy) -> bool:
        """Whether the value (or, for tensors, their shape) comes from a tensor's data."""
        return p.node in self.data or p.node in self.data_shaped

    def guard(self, cond: fx.Proxy) -> None:
        """``torch._assert(cond)``, its message naming the user's line that branched."""
        trace = cond.node.meta.get("stack_trace") or ""
        lines = [ln.strip() for ln in trace.strip().splitlines()]
        where = " ".join(lines[-2:]) if lines else cond.node.name
        self.create_proxy(
            "call_function", torch._assert,
            (cond, f"{GUARD_MESSAGE}; these inputs' sizes take another branch at {where}"), {})
        self.guards.append(where)

    # ---- values ----------------------------------------------------------------------
    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any = None,
                     proxy_factory_fn: Any = None) -> Any:
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr,  # type: ignore[misc]
                                 proxy_factory_fn)
        if isinstance(p, fx.Proxy):
            self._evaluate(p.node, kind, target, args, kwargs)
        return p

    def _evaluate(self, node: fx.Node, kind: str, target: Any, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> None:
        nodes: list[fx.Node] = []

        def value(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                nodes.append(a.node)
                return self.values[a.node]
            if isinstance(a, fx.Node):
                nodes.append(a)
                return self.values[a]
            return a

        if kind == "placeholder":
            self.values[node] = self._placeholder_value(self._placeholders)
            self._placeholders += 1
            return
        if kind == "get_attr":
            obj: Any = self.root  # type: ignore[attr-defined]
            self._running = True  # the attributes themselves, not proxies for them
            try:
                for atom in str(target).split("."):
                    obj = getattr(obj, atom)
            finally:
                self._running = False
            self.values[node] = obj
            if isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter):
                # a buffer: a constant of the model (a branch on it is guarded, so one
                # changed later stops the graph instead of taking another branch)
                self.fixed.add(node)
            return
        vargs = fx.node.map_aggregate(args, value)
        vkwargs = fx.node.map_aggregate(kwargs, value)
        self._running = True
        try:
            with torch.no_grad():
                if kind == "call_function":
                    out = target(*vargs, **vkwargs)
                elif kind == "call_method":
                    out = getattr(vargs[0], target)(*vargs[1:], **vkwargs)
                elif kind == "call_module":
                    out = self.root.get_submodule(target)(*vargs, **vkwargs)  # type: ignore[attr-defined]
                else:  # output
                    return
        finally:
            self._running = False
        self.values[node] = out
        self._taint(node, kind, target, (args, kwargs), (vargs, vkwargs), nodes, out)

    def _taint(self, node: fx.Node, kind: str, target: Any, given: Any, values: Any,
               nodes: list[fx.Node], out: Any) -> None:
        """Sizes are read from shapes only: a Python value is a size where it comes from
        ``size()``/``shape``/``dim()``/``numel()`` of a tensor whose shape does not
        depend on data, or from Python arithmetic on sizes and constants; any other
        Python value computed from a tensor (``item()``, ``torch.equal``, ...) is data.
        A tensor's shape depends on data after ``nonzero``, ``unique``, a boolean mask,
        ..., and after any op on such a tensor."""
        vargs, _ = values
        tensor_nodes = [n for n in nodes if _has_tensor(self.values[n])]  # dicts too
        raw = _has_tensor([a for a in tree_leaves(given)  # tensors not from the graph
                           if not isinstance(a, (fx.Proxy, fx.Node))])
        self._track_fixed(node, kind, target, nodes, tensor_nodes, raw, out)
        if _tensor_like(out):
            index = vargs[1] if kind == "call_function" and target is operator.getitem else ()
            index = index if isinstance(index, (tuple, list)) else (index,)
            mask_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
            if (target in _DATA_SHAPED or mask_index
                    or any(n in self.data_shaped or n in self.data for n in nodes)):
                self.data_shaped.add(node)
            return
        size_read = ((kind == "call_method" and target in _SIZE_METHODS)
                     or (kind == "call_function" and target is getattr
                         and vargs[1] in _SIZE_ATTRIBUTES)
                     or (kind == "call_function" and target is len and _tensor_like(vargs[0])))
        if size_read:
            if nodes and nodes[0] in self.data_shaped:
                self.data.add(node)
            return
        if (any(n in self.data or n in self.data_shaped for n in nodes) or raw
                or any(n not in self.fixed for n in tensor_nodes)):
            self.data.add(node)

    def _track_fixed(self, node: fx.Node, kind: str, target: Any, nodes: list[fx.Node],
                     tensor_nodes: list[fx.Node], raw: bool, out: Any) -> None:
        """Whether ``node``'s tensor holds values the sizes fix: made by a factory from
        sizes and constants, or by an op (not random) on such tensors and sizes only.
        An in-place op or item assignment that may write other values into a tensor
        ends the tracking for the rest of the trace (the tensor may be a view of
        another: one written is not told apart)."""
        name = getattr(target, "__name__", str(target))
        in_place = target is operator.setitem or (name.endswith("_") and not name.startswith("_"))
        clean = (self._fixed_ok and kind in ("call_function", "call_method") and not raw
                 and not any(n in self.data or n in self.data_shaped for n in nodes)
                 and not any(part in name for part in _NOT_FIXED))
        if target in _LIKE:  # values from constants, shape from its input's
            fixed = clean and bool(tensor_nodes) and tensor_nodes[0] not in self.data_shaped
        else:
            fixed = clean and all(n in self.fixed for n in tensor_nodes) and (
                bool(tensor_nodes) or target in _FACTORIES)
        if in_place and not fixed:
            self._fixed_ok = False
            self.fixed.clear()
        elif fixed and _tensor_like(out):
            self.fixed.add(node)

    def _placeholder_value(self, k: int) -> Any:
        """The k-th input of ``forward``: an example input, a concrete argument or the
        parameter's default; ``*args`` the remaining examples, ``**kwargs`` none."""
        if k >= len(self._params):
            return self.example[k] if k < len(self.example) else None
        param = self._params[k]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return tuple(self.example[k:])
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return {}
        if param.name in self.concrete_args:
            return self.concrete_args[param.name]
        if k < len(self.example):
            return self.example[k]
        return None if param.default is inspect.Parameter.empty else param.default

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        # placeholders come in the order of forward's parameters (self left out)
        self.concrete_args = dict(concrete_args) if isinstance(concrete_args, dict) else {}
        try:
            params = list(inspect.signature(root_fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        self._params = params[1:] if is_module else params  # a module's forward: no self
        return super().create_args_for_root(root_fn, is_module, concrete_args)  # type: ignore[misc]

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """torch.fx's trace, with torch's factories (``torch.ones(B, N)``, ``arange``,
        ...) recorded where a size argument is a proxy: their argument parsers take
        only Python numbers there, so torch.fx cannot record them itself."""
        saved = {name: getattr(torch, name) for name in _FACTORY_NAMES}
        try:
            for name, fn in saved.items():
                setattr(torch, name, _recorded(fn))
            return super().trace(root, concrete_args)  # type: ignore[misc]
        finally:
            for name, fn in saved.items():
                setattr(torch, name, fn)

    # while a value is computed, modules run as themselves
    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self._running:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)  # type: ignore[misc]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)  # type: ignore[misc]

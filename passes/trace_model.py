"""Pass 1: trace a model with torch.fx and propagate shapes and FLOPs.

Reads: an ``nn.Module`` (or an already traced ``GraphModule``) and example inputs.
Writes: ``node.meta["tensor_meta"]`` (torch.fx ShapeProp),
``node.meta[S2H_FLOPS]``, the FLOPs that ``torch.utils.flop_counter`` counts for
that node on the example inputs, and ``node.meta[S2H_VALUE]``, the value of a node
that computes a Python number or tuple of numbers (a size, a count).
Postcondition: dead code is eliminated (its FLOPs are not the network's); every
node ran once on the example inputs (on meta tensors for a model of
``META_PROPAGATION_PARAMS`` parameters or more whose graph calls only torch's modules
and functions, see :func:`s2h_fx.fake.graph_is_fake_safe`; for real otherwise, or where
an op needs data); the graph is linted.
Running it twice on its own output changes nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import linecache
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from s2h_fx import mha, swin, transformer_layer
from s2h_fx.channels import S2H_FLOPS, S2H_VALUE
from s2h_fx.copying import BufferSnapshot, copy_module
from s2h_fx.deploy import max_rel_error
from s2h_fx.einsum import einsums_as_matmul
from s2h_fx.errors import InputError, InvariantError, TraceError
from s2h_fx.fake import graph_is_fake_safe
from s2h_fx.measure import counted_paths
from s2h_fx.observe import observe_calls
from s2h_fx.rules.timm_modules import std_conv_types
from s2h_fx.valued import ValuedTracer

log = logging.getLogger(__name__)


def _default_leaves() -> tuple[type, ...]:
    leaves: list[type] = []
    try:  # reads self.training at call time: tracing through it would bake the mode in
        from torchvision.ops import StochasticDepth

        leaves.append(StochasticDepth)
    except ImportError:  # pragma: no cover
        pass
    return tuple(leaves)


# Modules kept as call_module leaves beside torch.nn's own layers. Extend to keep
# a module of yours whole (it then needs a coupling rule to be pruned through).
LEAF_MODULES: list[type] = list(_default_leaves())


class _Tracer(fx.Tracer):
    """torch.fx's tracer with our leaves: ``LEAF_MODULES``, and those of a fallback plan
    (submodules by qualified name, module types) and its autowrapped functions."""

    def __init__(self, plan: TracePlan | None = None) -> None:
        plan = plan or TracePlan()
        super().__init__(autowrap_functions=tuple(plan.autowrap))
        self.leaf_names = frozenset(plan.leaves)
        self.leaf_types = tuple(LEAF_MODULES) + tuple(plan.leaf_types) + std_conv_types()
        # errors point at the user's line: create_node records it (torch.fx's own
        # record_stack_traces formats the whole stack of every node, which costs more than
        # the rest of tracing on a ViT)
        self.record_stack_traces = False

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if "stack_trace" not in node.meta:
            node.meta["stack_trace"] = _first_user_frame(sys._getframe(1))
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaf_names or isinstance(m, self.leaf_types)
                or super().is_leaf_module(m, qualname))


class _ValuedFxTracer(ValuedTracer, _Tracer):
    """Our tracer, with the example's values: control flow on sizes is decided by the
    example inputs and guarded (:mod:`s2h_fx.valued`)."""

    def __init__(self, plan: TracePlan, example_inputs: tuple[Any, ...]) -> None:
        _Tracer.__init__(self, plan)
        self.init_values(example_inputs)
        # a buffer read as an attribute is a proxy (its value known): a method of it
        # called with a size (``self.table.expand(B, -1)``) is recorded, not run
        self.proxy_buffer_attributes = True


class _ShapeRunFailed(Exception):
    """A node could not run on meta tensors (it needs data, or mixes a meta tensor with
    one the graph made on a real device): run for real instead."""


class _FlopShapeProp(ShapeProp):
    """ShapeProp that also records each node's flop_counter FLOPs (one counter for the
    run: a node's FLOPs are what the count grew by while it ran). With ``meta``, on
    meta tensors: the graph's parameters, buffers and tensor attributes and the inputs
    are swapped for meta tensors of the same shapes and dtypes for the run (the same
    shapes, values of sizes and FLOPs, no arithmetic); the real ones are put back."""

    def __init__(self, gm: fx.GraphModule, meta: bool = False) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our error already names the node
        self.meta = meta
        self.counter = FlopCounterMode(display=False)

    def propagate(self, *args: Any) -> Any:
        if self.meta:
            args = tuple(_as_meta(a) if isinstance(a, torch.Tensor) else a for a in args)
        # ShapeProp prints a raw traceback before re-raising; we raise a clear error instead
        with _on_meta(self.module) if self.meta else contextlib.nullcontext(), \
                self.counter, contextlib.redirect_stderr(io.StringIO()):
            return super().propagate(*args)

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        try:
            result = super().run_node(n)
        except Exception as exc:  # name the node and the user's line
            if self.meta:
                raise _ShapeRunFailed(n.format_node()) from exc
            root: BaseException = exc
            while root.__cause__ is not None:
                root = root.__cause__
            first = (str(root).strip().splitlines() or [""])[0]
            raise InputError(
                f"running the traced graph on the example inputs failed at node "
                f"{n.format_node()}{user_line(n)}: {type(root).__name__}: {first}. "
                "Check that example_inputs have the shapes and dtypes the model expects."
            ) from exc
        n.meta[S2H_FLOPS] = float(self.counter.get_total_flops() - before)
        if _is_python_value(result):  # sizes and counts, for rules that read them
            n.meta[S2H_VALUE] = tuple(result) if isinstance(result, torch.Size) else result
        return result


def _as_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


@contextlib.contextmanager
def _on_meta(module: nn.Module) -> Iterator[None]:
    """Every parameter, buffer and tensor attribute of ``module`` a meta tensor of its
    shape, dtype and strides while inside; the real ones are put back on leaving."""
    saved: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for m in module.modules():
            stores: list[dict[str, Any]] = [m._parameters, m._buffers, vars(m)]
            for store in stores:
                for key, t in list(store.items()):
                    if isinstance(t, torch.Tensor) and not t.is_meta:
                        saved.append((store, key, t))
                        store[key] = _as_meta(t)
        yield
    finally:
        for store, key, t in reversed(saved):
            store[key] = t


def holds_meta(model: nn.Module) -> bool:
    """Whether a parameter, buffer or tensor attribute of ``model`` is a meta tensor."""
    return any(isinstance(t, torch.Tensor) and t.is_meta
               for m in model.modules()
               for store in (m._parameters, m._buffers, vars(m)) for t in store.values())


def _is_python_value(value: Any) -> bool:
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, (tuple, list)) and all(
        isinstance(v, (bool, int, float)) for v in value)


def user_line(node: fx.Node) -> str:
    """' (File ..., line ..., in f: code)' of the user's code that made the node, or ''."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return ""
    lines = trace.strip().splitlines()
    found = ""
    for k, line in enumerate(lines):
        text = line.strip()
        if text.startswith("File") and not any(p in text for p in _LIBRARY_PATHS):
            code = lines[k + 1].strip() if k + 1 < len(lines) else ""
            found = text + (f": {code}" if code and not code.startswith("File") else "")
    return f" ({found})" if found else ""


_LIBRARY_PATHS = ("/torch/", "/s2h_fx/", "/passes/")


def _first_user_frame(frame: Any) -> str:
    """The innermost frame outside torch and s2h-fx, as a traceback line and its code."""
    while frame is not None:
        code = frame.f_code
        if not any(p in code.co_filename for p in _LIBRARY_PATHS):
            line = linecache.getline(code.co_filename, frame.f_lineno).strip()
            return f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n    {line}\n'
        frame = frame.f_back
    return ""


def _source_of_failure(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/s2h_fx/" not in f.filename
            and "/passes/" not in f.filename]
    if not user:
        return ""
    f = user[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}: {f.line}'


# ---- getting through what torch.fx cannot trace --------------------------------------

S2H_TRACE = "s2h_trace"  # gm.meta: how the model was traced (method, leaves, autowrap)
S2H_TRACE_LEAF = "s2h_trace_leaf"  # node.meta of a leaf the tracer added: why it is one
MAX_FALLBACK_LEAVES = 64  # retraces before giving up


@dataclass
class TracePlan:
    """What the tracer treats as leaves beyond ``LEAF_MODULES``, each with its reason."""

    leaves: dict[str, str] = field(default_factory=dict)  # submodule qualname -> reason
    leaf_types: dict[type, str] = field(default_factory=dict)  # every instance -> reason
    autowrap: dict[Callable[..., Any], str] = field(default_factory=dict)  # function -> reason
    # traced with the example's values (control flow on sizes decided and guarded), and
    # the user's lines where a guard was put
    valued: bool = False
    guards: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """'fx', 'timm' (only timm's own not-traceable modules and functions) or 'leaf
        fallback' (a failing submodule of no such kind made a leaf), with ', sizes of the
        example' where a decision was taken on the example's sizes (each one guarded)."""
        if not (self.leaves or self.leaf_types or self.autowrap):
            return "fx, sizes of the example" if self.guards else "fx"
        timm_only = not self.leaves and all(
            _TIMM_MARK in r for r in [*self.leaf_types.values(), *self.autowrap.values()])
        return ("timm" if timm_only else "leaf fallback") + (
            ", sizes of the example" if self.guards else "")


_TIMM_MARK = "timm registers it as not traceable"


def _trace_with_fallback(
    work: nn.Module, name: str, concrete_args: dict[str, Any] | None,
    example_inputs: tuple[Any, ...] | None = None,
) -> tuple[fx.Graph, TracePlan]:
    """Plain torch.fx first. When tracing fails, widen the plan and retrace:

    0. with ``example_inputs``, once: trace again with the example's values
       (:mod:`s2h_fx.valued`): control flow on sizes is taken as on the example
       inputs and guarded in the graph; kept only if the traced graph computes what
       the model does on them. Then, while tracing still fails:
    1. the innermost failing frame is one of timm's not-traceable functions
       (``timm.layers.register_notrace_function``): autowrap it (a call_function node);
    2. else the innermost submodule whose ``forward`` is on the traceback: if it or a
       parent is of a type timm registers as not traceable (``register_notrace_module``),
       all instances of the innermost such type become leaves; else that submodule does
       (and all of its type once a second instance fails the same way).

    A leaf without a coupling rule is an op without a rule: the channels at its boundary
    are frozen by the grouping pass. Nothing left to make a leaf (the failure is in the
    model's own ``forward``) or ``MAX_FALLBACK_LEAVES`` retraces: ``TraceError``.
    """
    plan = TracePlan()
    qualnames = {id(m): q for q, m in work.named_modules()}
    retraces = 0
    while True:
        try:
            if not plan.valued:
                return _Tracer(plan).trace(work, concrete_args=concrete_args), plan
            return _valued_trace(work, plan, concrete_args, example_inputs or ()), plan
        except Exception as exc:
            if plan.valued and (isinstance(exc, _ValuedMismatch) or not _control_flow(exc)):
                # traced but not the model's function, or the values themselves failed
                # (not control flow on data): back to plain tracing and leaves
                log.info("tracing %s with the example's values: %s: %s", name,
                         type(exc).__name__, _first_line(exc))
                plan.valued, plan.guards, example_inputs = False, [], None
                continue
            if not plan.valued and example_inputs is not None and _valued_affordable(work):
                plan.valued = True  # once: the same trace, with the example's values
                continue
            if retraces == MAX_FALLBACK_LEAVES:
                raise _trace_error(name, exc, plan, limit=True) from exc
            if not _widen(plan, exc, work, qualnames):
                raise _trace_error(name, exc, plan) from exc
        retraces += 1


class _ValuedMismatch(Exception):
    """A graph traced with the example's values does not compute the model's outputs."""


# A trace with the example's values runs the model for real, and again at every
# retrace with a new leaf: from this many parameters it is not tried (a 167M-parameter
# vision tower at 768x768 took minutes), and control flow on sizes makes leaves as before.
VALUED_TRACE_PARAMS = 50_000_000


def _valued_affordable(work: nn.Module) -> bool:
    return sum(p.numel() for p in work.parameters()) <= VALUED_TRACE_PARAMS


def _control_flow(exc: BaseException) -> bool:
    """Whether tracing stopped at Python control flow on a traced value (torch.fx's
    TraceError, here or as a cause)."""
    while exc is not None:
        if isinstance(exc, fx.proxy.TraceError):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _valued_trace(work: nn.Module, plan: TracePlan, concrete_args: dict[str, Any] | None,
                  example_inputs: tuple[Any, ...]) -> fx.Graph:
    """Trace with the example's values; the graph must give the model's outputs on the
    example inputs (each traced op ran on them; this checks the graph as a whole). The
    example inputs are copied and the model's buffers put back after each run: a
    forward that writes into its input or a buffer leaves no trace."""
    with buffers_kept(work):
        tracer = _ValuedFxTracer(plan, _copies(example_inputs))
        graph = tracer.trace(work, concrete_args=concrete_args)
    plan.guards = list(tracer.guards)
    gm = fx.GraphModule(work, graph)
    with torch.no_grad(), counted_paths():
        with buffers_kept(work):
            got = gm(*_copies(example_inputs))
        with buffers_kept(work):
            want = work(*_copies(example_inputs))
    if not max_rel_error(want, got) <= 1e-5:  # inf where the outputs do not pair up
        raise _ValuedMismatch("the graph's outputs differ from the model's on the example inputs")
    return graph


def _defaults_not_given(
    work: nn.Module, n_inputs: int, concrete_args: dict[str, Any] | None
) -> dict[str, Any] | None:
    """``concrete_args`` plus the default of each ``forward`` parameter that the example
    inputs do not reach (``forward(x, mask=None)`` called with ``x`` alone): traced as a
    proxy, ``if mask is not None`` would take the branch the call never takes."""
    try:
        params = list(inspect.signature(work.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read
        return concrete_args
    out = dict(concrete_args or {})
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for k, p in enumerate(params):
        if (k >= n_inputs and p.kind in positional and p.default is not p.empty
                and p.name not in out and (p.default is None or isinstance(p.default, bool))):
            out[p.name] = p.default
    return out or None


def _trace_error(name: str, exc: Exception, plan: TracePlan, limit: bool = False) -> TraceError:
    where = _source_of_failure(exc)
    tried = ""
    if _plan_names(plan):
        tried = (f"\n  Already traced as leaves: {', '.join(_plan_names(plan))}"
                 + (f" (gave up after {MAX_FALLBACK_LEAVES} retraces)" if limit else
                    "; the failure is in the model's own forward, with no submodule left to "
                    "make a leaf"))
    return TraceError(
        f"torch.fx could not trace {name}: {type(exc).__name__}: {_first_line(exc)}"
        + (f"\n  at {where}" if where else "") + tried
        + "\n  Data-dependent control flow or calls that fx cannot record stop tracing. "
        "Mark the offending submodule as a leaf (a call_module node), wrap the function "
        "with torch.fx.wrap, or pass concrete_args for Python-valued arguments."
    )


def _plan_names(plan: TracePlan) -> list[str]:
    return [*plan.leaves, *(t.__name__ for t in plan.leaf_types),
            *(_fn_name(f) for f in plan.autowrap)]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _widen(plan: TracePlan, exc: Exception, work: nn.Module, qualnames: dict[int, str]) -> bool:
    """Add one leaf (or autowrapped function) that gets past ``exc``; False if none."""
    why = f"{type(exc).__name__}: {_first_line(exc)}"[:300]
    codes = [tb.tb_frame.f_code for tb in _tb_frames(exc)]
    for fn in reversed([_timm_function(c) for c in codes]):
        if fn is not None and fn not in plan.autowrap:
            plan.autowrap[fn] = f"{_TIMM_MARK} (register_notrace_function); tracing it: {why}"
            log.info("tracing %s: autowrapping %s (%s)", type(work).__name__, _fn_name(fn), why)
            return True
    chain = [qualnames[id(m)] for m in _failing_modules(exc) if id(m) in qualnames]
    chain = [q for q in dict.fromkeys(chain) if q]  # innermost first; the root is no leaf
    if not chain:
        return False
    timm_types = _timm_leaf_types()
    for q in chain:
        cls = type(work.get_submodule(q))
        if cls in timm_types and cls not in plan.leaf_types:
            plan.leaf_types[cls] = f"{_TIMM_MARK} (register_notrace_module); tracing {q}: {why}"
            log.info("tracing %s: every %s is a leaf (%s)", type(work).__name__, cls.__name__, why)
            return True
    q = chain[0]
    cls = type(work.get_submodule(q))
    if any(type(work.get_submodule(o)) is cls for o in plan.leaves):
        plan.leaf_types[cls] = f"traced as a leaf (as is every {cls.__name__}): {why}"
    elif q not in plan.leaves:
        plan.leaves[q] = f"traced as a leaf: {why}"
    else:
        return False
    log.info("tracing %s: %s (%s) is a leaf: %s", type(work).__name__, q, cls.__name__, why)
    return True


def _tb_frames(exc: BaseException) -> list[Any]:
    tbs = []
    tb = exc.__traceback__
    while tb is not None:
        tbs.append(tb)
        tb = tb.tb_next
    return tbs


def _failing_modules(exc: BaseException) -> list[nn.Module]:
    """Modules whose method is on the traceback (``self`` of the frame), innermost first."""
    found = []
    for tb in reversed(_tb_frames(exc)):
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, nn.Module):
            found.append(obj)
    return found


def _timm_helpers() -> Any:
    """timm's fx helper module (``timm.layers._fx``; older: ``timm.models.layers``), or None."""
    for path in ("timm.layers._fx", "timm.layers", "timm.models._features_fx"):
        try:
            mod = importlib.import_module(path)
        except ImportError:
            continue
        if hasattr(mod, "get_notrace_modules") or hasattr(mod, "_leaf_modules"):
            return mod
    return None


def _timm_leaf_types() -> tuple[type, ...]:
    if "timm" not in sys.modules:  # not a timm model: do not import it
        return ()
    fx_mod = _timm_helpers()
    if fx_mod is None:
        return ()
    get = getattr(fx_mod, "get_notrace_modules", None)
    types = get() if get is not None else list(getattr(fx_mod, "_leaf_modules", ()))
    return tuple(t for t in types if isinstance(t, type))


def _timm_function(code: Any) -> Callable[..., Any] | None:
    """The timm not-traceable function whose code object is ``code``, or None."""
    if "timm" not in sys.modules:
        return None
    fx_mod = _timm_helpers()
    if fx_mod is None:
        return None
    get = getattr(fx_mod, "get_notrace_functions", None)
    fns = get() if get is not None else list(getattr(fx_mod, "_autowrap_functions", ()))
    for fn in fns:
        if callable(fn) and getattr(inspect.unwrap(fn), "__code__", None) is code:
            return fn
    return None


def _fn_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def _record(gm: fx.GraphModule, plan: TracePlan, kept: dict[str, str]) -> dict[str, Any]:
    """``gm.meta[S2H_TRACE]`` (plain str/dict values: picklable and deep-copyable); each
    leaf node added by the plan, and each attention or transformer module kept whole (``kept``),
    gets its reason in ``node.meta[S2H_TRACE_LEAF]``."""
    leaves: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        reason = (plan.leaves.get(target) or plan.leaf_types.get(type(gm.get_submodule(target)))
                  or kept.get(target))
        if reason is not None:
            leaves[target] = node.meta[S2H_TRACE_LEAF] = reason
    autowrap = {_fn_name(f): r for f, r in plan.autowrap.items()}
    if leaves or autowrap:
        log.info("traced %s with %d leaf module(s) and %d autowrapped function(s): %s",
                 gm.__class__.__name__, len(leaves), len(autowrap),
                 "; ".join(f"{k}: {v}" for k, v in [*leaves.items(), *autowrap.items()]))
    if plan.guards:
        log.info("traced %s for the sizes of its example inputs: %d branch(es) on sizes "
                 "taken as on them and guarded in the graph", gm.__class__.__name__,
                 len(plan.guards))
    return {"method": plan.method, "leaves": leaves, "autowrap": autowrap,
            "guards": list(plan.guards)}


def trace_model(
    model: nn.Module, example_inputs: tuple[Any, ...], *, concrete_args: dict[str, Any] | None = None
) -> fx.GraphModule:
    """Trace ``model`` (a copy; the user's model is not touched) and propagate shapes.

    The model is traced in eval mode so that training-only branches (auxiliary
    heads) are left out; standard ``torch.nn`` layers stay ``call_module`` leaves,
    except ``nn.MultiheadAttention`` and ``nn.Transformer`` and its encoder/decoder
    (layers), traced as the ops they compute where they say them exactly
    (:mod:`s2h_fx.mha`, :mod:`s2h_fx.transformer_layer`; the example inputs are run first
    to see how they are called); one kept whole carries its reason in
    ``node.meta[S2H_TRACE_LEAF]``.
    Where torch.fx cannot get through a submodule (control flow on data or shapes,
    ``len()`` of a proxy, ...), that submodule (or the timm function that failed) is
    made a leaf and the model retraced (:func:`_trace_with_fallback`); its boundary
    channels are then frozen as those of an op without a rule. How it was traced is in
    ``gm.meta[S2H_TRACE]``; each leaf node added so carries its reason in
    ``node.meta[S2H_TRACE_LEAF]``.
    """
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise InputError(
            "example_inputs is required: a non-empty tuple of tensors the model is called "
            "with, e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
        )
    # the runs below work on copies: a forward that writes into its input leaves the
    # caller's tensors alone
    example_inputs = _copies(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = copy_module(model)
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        work = copy_module(model)
        was_training = work.training
        work.eval()
        # nn.Transformer's modules, then nn.MultiheadAttention, are traced as their ops
        # where they can say them exactly
        with buffers_kept(work):  # a forward that updates a buffer runs here uncounted
            seen = observe_calls(work, example_inputs, {"mha": mha.RECORDER,
                                                        "layers": transformer_layer.RECORDER,
                                                        "swin": swin.RECORDER})
        kept, attention = transformer_layer.prepare(work, seen["layers"], seen["mha"])
        kept.update(mha.prepare(work, attention))
        kept.update(swin.prepare(work, seen["swin"]))  # torchvision's window attention
        concrete = _defaults_not_given(work, len(example_inputs), concrete_args)
        graph, plan = _trace_with_fallback(work, type(model).__name__, concrete, example_inputs)
        # pickling a GraphModule stores its graph's tracer class by reference: keep ours
        # out so that a saved pruned model loads without s2h-fx installed
        graph._tracer_cls = None
        gm = fx.GraphModule(work, graph, type(work).__name__)
        gm.meta[S2H_TRACE] = _record(gm, plan, kept)
        gm.train(was_training)
    drop_dead_code(gm.graph)  # results nobody uses are not part of the network
    gm.recompile()
    _tensor_attributes_as_buffers(gm)
    einsums_as_matmul(gm)  # attention written with einsum: the matmul rules apply
    propagate(gm, example_inputs)
    return gm


def _tensor_attributes_as_buffers(gm: fx.GraphModule) -> None:
    """A tensor the graph reads that is a plain attribute of a module (neither
    parameter nor buffer, e.g. ``self.conv.scale = torch.rand(...)``) becomes a
    non-persistent buffer of that module in the traced copy: slicing, the hard
    branch's tensor substitution and ``.to()`` reach parameters and buffers only.
    The state dict is unchanged (non-persistent buffers are not in it)."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = owner.__dict__.get(name)
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            delattr(owner, name)
            owner.register_buffer(name, value, persistent=False)


def _copies(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The inputs with each tensor cloned (a forward may write into its input)."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Put every buffer of ``module`` back as it was (a forward that updates a buffer,
    run on the example inputs for shapes, leaves the model's state as the user's)."""
    snapshot = BufferSnapshot(list(module.buffers()))
    try:
        yield
    finally:
        snapshot.restore()


def drop_dead_code(graph: fx.Graph) -> None:
    """torch.fx's dead-code elimination, keeping every call that writes into a tensor:
    one with an ``out=`` tensor (``torch.matmul(a, b, out=o)`` then ``f(o)``) and an
    in-place op (``buf.mul_(0.5)``, ``torch.relu_(x)``): its result may be read only
    through the tensor it wrote, which torch.fx does not see as a use (a buffer updated
    in ``forward`` was left out of the graph)."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or "out" in n.kwargs
                              or _writes_in_place(n))


def _writes_in_place(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return name.endswith("_") and not name.startswith("_")


# Shape and FLOPs propagation runs on meta tensors from this many parameters up. A meta
# op costs a fixed ~0.4 ms here (more for ops torch decomposes in Python), a real one
# its arithmetic. Measured on this project's 2-core machine (1 thread, 224x224, meta /
# real seconds, one flop counter for the run): resnet18 0.028 / 0.065, resnet50 0.069 /
# 0.144, convnext_tiny 0.094 / 0.161, vit_b_16 0.122 / 0.473; below it
# mobilenet_v3_large (5.5M) 0.114 / 0.049, efficientnet_b0 (5.3M) 0.089 / 0.060.
META_PROPAGATION_PARAMS = 10_000_000
# (A graph holding an RNN (nn.LSTM, nn.GRU, ...) runs for real: on the CPU their fused
# kernels count no FLOPs, on meta tensors they decompose into counted matrix products,
# and the two counts must agree with what flop_counter says of the exported network.)


@torch.no_grad()
def propagate(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    """(Re)run shape and FLOPs propagation in eval mode, restoring the training flag
    and every buffer (a forward that updates one leaves the model as it was)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(placeholders):
        raise InputError(
            f"{len(example_inputs)} example inputs given but the model takes "
            f"{len(placeholders)} positional inputs"
        )
    was_training = gm.training
    gm.eval()
    try:
        # a leaf nn.MultiheadAttention's FLOPs counted in full
        with counted_paths(), buffers_kept(gm):
            meta = (sum(p.numel() for p in gm.parameters()) >= META_PROPAGATION_PARAMS
                    and graph_is_fake_safe(gm, example_inputs)
                    and not any(isinstance(m, nn.RNNBase) for m in gm.modules()))
            try:
                _FlopShapeProp(gm, meta=meta).propagate(*example_inputs)
                if meta and holds_meta(gm):  # something kept one: a real run writes over it
                    raise _ShapeRunFailed("a meta tensor was left in the model")
            except _ShapeRunFailed as exc:  # an op needs data: run for real
                log.info("propagating shapes on meta tensors failed at %s (%s); running "
                         "for real", exc, exc.__cause__)
                _FlopShapeProp(gm).propagate(*example_inputs)
            if meta and holds_meta(gm):
                raise InvariantError("a meta tensor is left in the model after propagating "
                                     "shapes for real")
    finally:
        gm.train(was_training)
    gm.graph.lint()
    return gm

"""Pass 1: trace a model with torch.fx and propagate shapes and FLOPs.

Reads: an ``nn.Module`` (or an already traced ``GraphModule``) and example inputs.
Writes: ``node.meta["tensor_meta"]`` (torch.fx ShapeProp),
``node.meta[S2H_FLOPS]``, the FLOPs that ``torch.utils.flop_counter`` counts for
that node on the example inputs, and ``node.meta[S2H_VALUE]``, the value of a node
that computes a Python number or tuple of numbers (a size, a count).
Postcondition: dead code is eliminated (its FLOPs are not the network's); every
node ran once on the example inputs; the graph is linted.
Running it twice on its own output changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import io
import linecache
import sys
import traceback
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from s2h_fx.channels import S2H_FLOPS, S2H_VALUE
from s2h_fx.errors import InputError, TraceError


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
    def __init__(self) -> None:
        super().__init__()
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
        return isinstance(m, tuple(LEAF_MODULES)) or super().is_leaf_module(m, qualname)


class _FlopShapeProp(ShapeProp):
    """ShapeProp that also records each node's flop_counter FLOPs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our error already names the node

    def run_node(self, n: fx.Node) -> Any:
        counter = FlopCounterMode(display=False)
        try:
            # ShapeProp prints a raw traceback before re-raising; we raise a clear error instead
            with counter, contextlib.redirect_stderr(io.StringIO()):
                result = super().run_node(n)
        except Exception as exc:  # name the node and the user's line
            root: BaseException = exc
            while root.__cause__ is not None:
                root = root.__cause__
            first = (str(root).strip().splitlines() or [""])[0]
            raise InputError(
                f"running the traced graph on the example inputs failed at node "
                f"{n.format_node()}{user_line(n)}: {type(root).__name__}: {first}. "
                "Check that example_inputs have the shapes and dtypes the model expects."
            ) from exc
        n.meta[S2H_FLOPS] = float(counter.get_total_flops())
        if _is_python_value(result):  # sizes and counts, for rules that read them
            n.meta[S2H_VALUE] = tuple(result) if isinstance(result, torch.Size) else result
        return result


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


def trace_model(
    model: nn.Module, example_inputs: tuple[Any, ...], *, concrete_args: dict[str, Any] | None = None
) -> fx.GraphModule:
    """Trace ``model`` (a copy; the user's model is not touched) and propagate shapes.

    The model is traced in eval mode so that training-only branches (auxiliary
    heads) are left out; standard ``torch.nn`` layers stay ``call_module`` leaves.
    """
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise InputError(
            "example_inputs is required: a non-empty tuple of tensors the model is called "
            "with, e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
        )
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        work = copy.deepcopy(model)
        was_training = work.training
        work.eval()
        try:
            graph = _Tracer().trace(work, concrete_args=concrete_args)
            # pickling a GraphModule stores its graph's tracer class by reference: keep ours
            # out so that a saved pruned model loads without s2h-fx installed
            graph._tracer_cls = None
            gm = fx.GraphModule(work, graph, type(work).__name__)
        except Exception as exc:
            where = _source_of_failure(exc)
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}"
                + (f"\n  at {where}" if where else "")
                + "\n  Data-dependent control flow or calls that fx cannot record stop tracing. "
                "Mark the offending submodule as a leaf (a call_module node), wrap the function "
                "with torch.fx.wrap, or pass concrete_args for Python-valued arguments."
            ) from exc
        gm.train(was_training)
    gm.graph.eliminate_dead_code()  # results nobody uses are not part of the network
    gm.recompile()
    propagate(gm, example_inputs)
    return gm


@torch.no_grad()
def propagate(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    """(Re)run shape and FLOPs propagation in eval mode, restoring the training flag."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(placeholders):
        raise InputError(
            f"{len(example_inputs)} example inputs given but the model takes "
            f"{len(placeholders)} positional inputs"
        )
    was_training = gm.training
    gm.eval()
    try:
        _FlopShapeProp(gm).propagate(*example_inputs)
    finally:
        gm.train(was_training)
    gm.graph.lint()
    return gm

"""Running a model on fake tensors: shapes, dtypes and FLOPs without the arithmetic.

Where a model holds ``nn.MultiheadAttention`` or ``nn.Transformer`` modules, the
prepare pass runs it eagerly once to see how they are called (their arguments'
kinds and ranks, not their values), before tracing it. That run needs no numbers,
and on a ViT-Base at 224x224 the arithmetic is a quarter of the prepare time.
Under :func:`fake_mode` every op runs on torch's fake tensors (its meta kernels; a
real parameter or input is converted to a fake one when it is used, the real one
is never written), at a fixed cost per op instead.

A fake run is only an optimisation: where it cannot be trusted the caller runs
for real. It cannot be where an op needs data (``.item()``, ``.tolist()``, a
``nonzero`` size): the fake run raises and the caller falls back. It must not be
where code outside torch could keep a fake tensor (a module that caches a tensor
in eval mode, a hook that stores what it computes): :func:`modules_are_fake_safe`
accepts a model only when all its modules are torch's or torchvision's and none
has forward hooks, and :func:`holds_fake` checks it after (a fake tensor found
means a real run follows, which writes real ones over it).
Shape and FLOPs propagation through the traced graph needs no numbers either; it runs
on meta tensors (``passes.trace_model``: lighter than fake ones, since the graph's
tensors are all known and swapped in one place) for models of
``META_PROPAGATION_PARAMS`` parameters or more: a meta op costs a fixed fraction of a
millisecond, more than the arithmetic it saves on a small CNN.
:func:`graph_is_fake_safe` accepts a traced graph for such a run only when it calls
torch's or torchvision's modules and torch's or Python's functions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

_SAFE_MODULES = ("torch.", "torchvision.")
_SAFE_FUNCTIONS = ("torch", "operator", "_operator", "builtins", "math")


def fake_mode() -> Any:
    """A mode in which every op runs on fake tensors; real ones are converted as they
    are used (once per mode: enter the same mode again for every step of one run)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks (``spectral_norm``'s pre-hook stores the weight
    it computes on the module: a fake one in a fake run)."""
    return bool(m._forward_pre_hooks or m._forward_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_

    return bool(module_._global_forward_pre_hooks or module_._global_forward_hooks)


def _safe_module(m: nn.Module) -> bool:
    """One of torch's or torchvision's modules (none keeps a tensor it computed),
    without forward hooks."""
    return type(m).__module__.startswith(_SAFE_MODULES) and not _hooked(m)


def modules_are_fake_safe(model: nn.Module) -> bool:
    """Whether every module of ``model`` is safe (:func:`_safe_module`) and no global
    forward hook is set, so that a fake run leaves nothing fake behind."""
    return not _global_hooks() and all(_safe_module(m) for m in model.modules())


def graph_is_fake_safe(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> bool:
    """Whether running ``gm`` on fake tensors can leave nothing fake behind and computes
    what a real run would: inputs that are tensors or plain Python values, torch's and
    torchvision's modules, torch's, ``operator``'s, ``math``'s and Python's functions,
    and tensor methods."""
    if not all(isinstance(x, (torch.Tensor, bool, int, float, type(None))) for x in example_inputs):
        return False
    if _global_hooks():
        return False
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if not _safe_module(gm.get_submodule(str(node.target))):
                return False
        elif node.op == "call_function":
            home = getattr(node.target, "__module__", None) or ""
            if home.split(".")[0] not in _SAFE_FUNCTIONS:
                return False
    return True


def holds_fake(model: nn.Module) -> bool:
    """Whether any module keeps a fake tensor among its attributes (directly or
    one level inside a dict, list or tuple): a cache filled by a fake run."""
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, dict):
                inner: Any = list(value.values())
            elif isinstance(value, list | tuple):
                inner = value
            else:
                inner = (value,)
            if any(is_fake(v) for v in inner):
                return True
    return False

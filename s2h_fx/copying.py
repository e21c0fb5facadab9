"""Deep copies of module trees without ``copy.deepcopy``'s per-object overhead.

``copy.deepcopy(model)`` reduces every module to its state and rebuilds it, and a
``GraphModule`` re-runs its whole ``__init__`` (a walk of the graph's targets and a
recompile). On a ResNet-50 that is most of the time ``prune_graph`` and ``export``
spend copying. :func:`copy_module` makes the same copy (a new object per module,
every tensor cloned unless ``memo`` maps it, every other attribute deep-copied)
by copying each module's ``__dict__`` directly; immutable values are taken as
they are. A ``GraphModule`` loses its forward and backward hooks and runs its
``_deepcopy_hooks``, as its own ``__deepcopy__`` does (which also drops attributes
its graph does not use; those are kept here). A class that customises copying
(its own ``__deepcopy__``, ``__reduce__``, ``__getstate__`` or ``__setstate__``)
is handed to ``copy.deepcopy``, so its copy is exactly what it would have been.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn

# values copy.deepcopy returns as they are
_ATOMIC = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)
_COPY_HOOKS = ("__deepcopy__", "__copy__", "__reduce__", "__reduce_ex__",
               "__getstate__", "__setstate__")
# a GraphModule's deepcopy re-inits it and keeps only its state-dict and graph hooks
_CALL_HOOKS = frozenset({"_forward_hooks", "_forward_hooks_with_kwargs",
                         "_forward_hooks_always_called", "_forward_pre_hooks",
                         "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                         "_backward_pre_hooks", "_is_full_backward_hook"})


def copy_module(module: nn.Module, memo: dict[int, Any] | None = None, *,
                recompile: bool = True) -> Any:
    """A deep copy of ``module`` (what ``copy.deepcopy(module, memo)`` returns).

    ``memo`` maps ``id(obj)`` to the object to use for ``obj`` (tensors to share
    instead of clone). A copied ``GraphModule`` gets a class of its own, as
    ``GraphModule`` instances do, and is recompiled unless ``recompile`` is False
    (the caller then recompiles it before running it)."""
    return _copy(module, {} if memo is None else memo, recompile)


def _copy(mod: nn.Module, memo: dict[int, Any], recompile: bool) -> Any:
    if id(mod) in memo:
        return memo[id(mod)]
    cls = type(mod)
    if not _copies_by_dict(cls):
        return copy.deepcopy(mod, memo)
    new = cls.__new__(cls)  # a GraphModule gets a new class: its forward lives there
    memo[id(mod)] = new
    state: dict[str, Any] = {}
    for key, value in mod.__dict__.items():
        if key == "_compiled_call_impl":  # nn.Module.__getstate__ drops it too
            continue
        if key == "_modules":  # nested GraphModules are recompiled: only the top waits
            state[key] = {name: None if child is None else _copy(child, memo, True)
                          for name, child in value.items()}
        elif isinstance(mod, fx.GraphModule) and key in _CALL_HOOKS:
            state[key] = type(value)() if isinstance(value, dict) else None
        elif type(value) in _ATOMIC:
            state[key] = value
        elif type(value) in (dict, OrderedDict) and not value:  # shared stays shared
            state[key] = memo.setdefault(id(value), type(value)())
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    if isinstance(new, fx.GraphModule):
        new.graph.owning_module = new
        if recompile:
            new.recompile()
        for hook in getattr(mod, "_deepcopy_hooks", ()):
            hook(new)
    return new


# per class (weakly held: every GraphModule instance has a class of its own)
_BY_DICT: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _copies_by_dict(cls: type) -> bool:
    """Whether ``copy.deepcopy`` of a ``cls`` instance is a copy of its ``__dict__``:
    no class between it and ``nn.Module`` customises copying (``GraphModule`` does,
    and is handled here: its ``__deepcopy__`` copies the ``__dict__`` and re-inits)."""
    known = _BY_DICT.get(cls)
    if known is None:
        known = _BY_DICT[cls] = _customises_nothing(cls)
    return known


def _customises_nothing(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass is nn.Module:
            return True
        if issubclass(fx.GraphModule, klass) or klass.__name__ == "GraphModuleImpl":
            continue
        if any(hook in vars(klass) for hook in _COPY_HOOKS):
            return False
    return False


class BufferSnapshot:
    """A copy of some buffers (BatchNorm running statistics, or every buffer of a
    module) to put back: a skipped step, the masked oracle or a run on the example
    inputs for shapes must leave no trace in them."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.buffers = buffers
        self.saved = [b.detach().clone() for b in buffers]

    def restore(self) -> None:
        with torch.no_grad():
            for b, s in zip(self.buffers, self.saved):
                b.copy_(s)

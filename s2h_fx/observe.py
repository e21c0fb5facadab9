"""One eager run of the model on the example inputs, recording how chosen modules are
called (the tracer inlines ``nn.MultiheadAttention`` and ``nn.Transformer``'s modules
only for the kinds of call it can express exactly, see :mod:`s2h_fx.mha` and
:mod:`s2h_fx.transformer_layer`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from s2h_fx.errors import InvariantError
from s2h_fx.fake import fake_mode, holds_fake, modules_are_fake_safe

log = logging.getLogger(__name__)

# selects the modules to watch, and describes one call of such a module
Recorder = tuple[Callable[[nn.Module], bool],
                 Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Hashable]]
DIFFERING = "called with differing kinds of input"


@torch.no_grad()
def observe_calls(model: nn.Module, example_inputs: tuple[Any, ...],
                  recorders: dict[str, Recorder]) -> dict[str, dict[str, Any]]:
    """Per recorder: qualified name -> the one kind of call its module got, or
    :data:`DIFFERING`. Modules never called are absent. The model runs once (in the
    mode it is in), and not at all when no recorder selects a module; a run that fails
    records nothing (shape propagation later reports the bad inputs). The run is on
    fake tensors (:mod:`s2h_fx.fake`) where every module is torch's or torchvision's,
    and for real where that fails or any module is someone else's."""
    watched: dict[int, tuple[str, str]] = {}
    for qualname, m in model.named_modules():
        for key, (select, _) in recorders.items():
            if select(m):
                watched[id(m)] = (key, qualname)
                break
    out: dict[str, dict[str, Any]] = {key: {} for key in recorders}
    if not watched:
        return out
    calls: dict[tuple[str, str], set[Hashable]] = {}

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key, qualname = watched[id(m)]
        calls.setdefault((key, qualname), set()).add(recorders[key][1](m, args, kwargs))

    fake_safe = modules_are_fake_safe(model)  # before our own hooks are on it
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in model.modules() if id(m) in watched]
    try:
        if not (fake_safe and _run_fake(model, example_inputs)):
            calls.clear()
            model(*example_inputs)
    except Exception as exc:  # shape propagation names the failing node later
        log.info("could not run the model to observe how its modules are called: %s", exc)
        calls.clear()
    finally:
        for h in handles:
            h.remove()
    if fake_safe and holds_fake(model):  # only a fake run could have left one
        raise InvariantError("a fake tensor is left in the model after observing it for real")
    for (key, qualname), kinds in calls.items():
        out[key][qualname] = next(iter(kinds)) if len(kinds) == 1 else DIFFERING
    return out


def _run_fake(model: nn.Module, example_inputs: tuple[Any, ...]) -> bool:
    """Run ``model`` (whose modules are fake-safe) on fake tensors; whether it ran."""
    try:
        with fake_mode():
            model(*example_inputs)
    except Exception as exc:  # an op needs data, or has no fake kernel: run for real
        log.debug("observing on fake tensors failed (%s): running for real", exc)
        return False
    if holds_fake(model):  # something kept a fake tensor: the real run writes over it
        log.debug("observing on fake tensors left a fake tensor in the model: running for real")
        return False
    return True

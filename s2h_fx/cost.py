"""Cost models: what a budget counts, as a function of the groups' widths.

A cost model is anything with the interface of
:class:`~s2h_fx.passes.build_flops_model.FlopsModel` (:class:`CostModel`): a sum
of *terms*, each depending on a few groups' widths, times ``scale`` (1 but for a
fitted latency model), plus a constant; ``model(widths)``
is the cost of the hard network at those widths (groups left out are at full
width), ``model.ratio(widths)`` that cost over ``model.total``, the cost of the
full network. Widths may be straight-through float tensors: every model is
differentiable in them, so the resource loss, the one-shot chooser and the
projection use FLOPs, parameters and latency alike.

* FLOPs: :func:`s2h_fx.passes.build_flops_model` (a ``float`` budget);
* parameters: :func:`build_params_model` here (``{"params": 0.4}``);
* latency: :func:`s2h_fx.latency.build_latency_model` (``{"latency": 0.5, ...}``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import fx, nn

from s2h_fx.channels import GroupingResult
from s2h_fx.config import PruneConfig
from s2h_fx.errors import InputError
from s2h_fx.passes.build_flops_model import (  # noqa: I001
    AxisSize,
    FlopsModel,
    FlopTerm,
    slot_axis_size,
)

log = logging.getLogger(__name__)


class CostTerm(Protocol):
    """One term of a cost model: its cost at given widths and the groups it reads."""

    @property
    def groups(self) -> frozenset[int]: ...

    def at(self, widths: dict[int, Any], sizes: dict[int, int]) -> Any: ...


class CostModel(Protocol):
    """Cost of the hard network as a function of the prunable groups' widths."""

    @property
    def terms(self) -> tuple[Any, ...]: ...  # CostTerm instances

    @property
    def sizes(self) -> dict[int, int]: ...

    @property
    def total(self) -> float: ...

    @property
    def scale(self) -> float: ...  # model(w) = constant + scale * sum of the terms at w

    def __call__(self, widths: dict[int, Any]) -> Any: ...

    def ratio(self, widths: dict[int, Any]) -> Any: ...


def count_parameters(module: nn.Module) -> int:
    """The number of parameter elements of ``module`` (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters())


def build_params_model(gm: fx.GraphModule, grouping: GroupingResult) -> FlopsModel:
    """The parameter count of the hard network: each parameter's element count scaled
    by the ratio of new to old size of every sliced axis (the axes the grouping
    records for it). The same sum of products of affine axis sizes as the FLOPs
    model, so exact for the emitted network and differentiable in the widths."""
    sizes = {g.index: g.size for g in grouping.prunable}
    axes_of: dict[str, list[AxisSize]] = {}
    for (path, _axis), ids in sorted(grouping.slots.items(), key=lambda kv: kv[0]):
        for size in slot_axis_size(ids, grouping, sizes):
            if size.coefs:
                axes_of.setdefault(path, []).append(size)
    terms, constant = [], 0.0
    for name, p in gm.named_parameters():
        axes = axes_of.get(name)
        if axes:
            terms.append(FlopTerm(name, float(p.numel()), tuple(axes)))
        else:
            constant += float(p.numel())
    log.debug("params model: %d sliced tensors, %.0f fixed parameters", len(terms), constant)
    return FlopsModel(tuple(terms), constant, sizes)



COST_NAMES = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}


def runtime_measure(config: PruneConfig, measure: Any = None) -> Any:
    """What a latency budget measures with: ``measure`` if given, else its runtime's
    :class:`s2h_fx.latency.RuntimeMeasure`; None for other budgets."""
    if config.kind != "latency" or measure is not None:
        return measure
    from s2h_fx import latency

    return latency.RuntimeMeasure(config.runtime or "", config.device, config.batch,
                                  config.threads)


def build_cost_model(config: PruneConfig, gm: fx.GraphModule, grouping: GroupingResult,
                     flops: FlopsModel, example_inputs: tuple[Any, ...],
                     measure: Any = None) -> CostModel:
    """The cost model of ``config``'s budget kind for the dense traced ``gm``: ``flops``
    itself for a FLOPs budget. A latency budget measures on ``config.runtime``
    (``measure``, a :class:`s2h_fx.latency.Measure`, replaces the runtime)."""
    if config.kind == "flops":
        return flops
    if config.kind == "params":
        return build_params_model(gm, grouping)
    from s2h_fx import latency

    options = latency.LatencyOptions(points=config.points, cache_dir=config.cache_dir)
    return latency.build_latency_model(gm, grouping, latency_input(config, example_inputs),
                                       runtime_measure(config, measure), options)


def latency_input(config: PruneConfig, example_inputs: tuple[Any, ...]) -> torch.Tensor:
    """The input a latency budget is timed on: the example at the budget's batch."""
    from s2h_fx import latency

    x = example_inputs[0] if example_inputs else None
    if len(example_inputs) != 1 or not isinstance(x, torch.Tensor):
        raise InputError("a latency budget needs exactly one example input tensor (the "
                         f"network is deployed and timed on it); got {len(example_inputs)}")
    return latency.batch_input(x, config.batch)

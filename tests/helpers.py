"""Shared test helpers: seeded models, random widths, relative error."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import s2h_fx
from s2h_fx.measure import counted_paths

from toy_zoo import TOY_ZOO

# torchvision models of the numerical ladder, at a small input
TV_MODELS = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "densenet121", "googlenet", "regnet_x_400mf", "resnext50_32x4d", "shufflenet_v2_x0_5",
    "convnext_tiny",
]
# a LayerNorm normalises over pruned channels: zeroing channels (the masked emulation)
# is then not the same network as removing them, so only the hard branch is the oracle
LAYER_NORM_OVER_PRUNED = {"norms", "convnext_tiny"}


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout draws differ between widths, so train-mode comparisons switch it off."""
    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, torchvision.ops.StochasticDepth)):
            m.p = 0.0
    return model


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    if name in TOY_ZOO:
        make, inputs = TOY_ZOO[name]
        return no_dropout(make()), (inputs(),)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    if name == "googlenet":
        model = torchvision.models.googlenet(weights=None, num_classes=10, aux_logits=False,
                                             init_weights=False)
    _randomise_bn(model)
    # 64 x 64: deep layers keep 2 x 2 maps, so train-mode batch statistics stay well conditioned
    return no_dropout(model), (torch.randn(2, 3, 64, 64),)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics, so that eval mode exercises the sliced buffers."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def random_keep(pruner: s2h_fx.Pruner, seed: int) -> tuple[dict[int, int], dict[int, np.ndarray]]:
    """Random widths from each group's candidates, and random whole atoms to keep."""
    rng = np.random.default_rng(seed)
    widths, keep = {}, {}
    for g in pruner.grouping.prunable:
        w = int(rng.choice(g.candidate_widths))
        atom_of = pruner.grouping.atom_of_class[g.index]
        chosen = rng.choice(atom_of.max() + 1, size=w // g.atom, replace=False)
        widths[g.index] = w
        keep[g.index] = np.flatnonzero(np.isin(atom_of, chosen))
    return widths, keep


def rel_err(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over all tensors of two outputs of the same structure."""
    la = [t.detach() for t in tree_leaves(a)]
    lb = [t.detach() for t in tree_leaves(b)]
    assert len(la) == len(lb) and len(la) > 0
    num = max(float((x - y).abs().max()) for x, y in zip(la, lb))
    den = max(float(y.abs().max()) for y in lb)
    return num / max(den, 1e-12)


def count_flops(model: nn.Module, inputs: tuple[Any, ...]) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counted_paths(), counter:
        model(*inputs)
    return float(counter.get_total_flops())


def check_random_keeps(pruner: s2h_fx.Pruner, inputs: tuple[Any, ...], seeds: int = 3) -> None:
    """For random widths and kept atoms (``seeds`` draws): the exported network equals
    the hard one (rel < 1e-5) and its flop_counter count is the FLOPs model's."""
    for seed in range(seeds):
        pruner.set_widths(*random_keep(pruner, seed))
        pruned = pruner.export(enforce_budget=False).eval()
        with torch.no_grad():
            assert rel_err(pruned(*inputs), pruner.eval()(*inputs)) < 1e-5
        assert count_flops(pruned, inputs) == pytest.approx(float(pruner.flops()), rel=1e-9)


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def prunable_group(pruner: s2h_fx.Pruner, member: str) -> s2h_fx.ChannelGroup:
    """The one prunable group that holds ``member`` (e.g. ``"proj:in"``)."""
    found = [g for g in pruner.grouping.prunable if member in g.members]
    assert len(found) == 1, pruner.grouping.table()
    return found[0]

"""The numerical ladder, in eval and train mode, on the toy zoo and torchvision:

1. all masks at 1 (and full widths) == the original model;
2. for random widths and random kept channels, the emitted graph == the hard
   network (relative error < 1e-5), and == the masked emulation where zeroing a
   channel is the same as removing it;
3. emitted FLOPs (torch.utils.flop_counter) == the FLOPs model == pruner.flops().
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import s2h_fx

from helpers import (
    LAYER_NORM_OVER_PRUNED,
    TV_MODELS,
    build,
    count_flops,
    random_keep,
    rel_err,
)
from toy_zoo import TOY_ZOO

MODELS = list(TOY_ZOO) + TV_MODELS
TOL = 1e-5
# The masked emulation is a different float computation (sums over zeroed channels);
# deep nets in train mode (batch statistics over 2 x 2 x 2 values) amplify that rounding.
EMULATION_TOL = 1e-4


@functools.lru_cache(maxsize=2)
def prepared(name: str) -> tuple[torch.nn.Module, tuple, s2h_fx.Pruner]:
    model, inputs = build(name)
    pruner = s2h_fx.prune_graph(model, budget=1.0, example_inputs=inputs)
    return model, inputs, pruner


def _set_mode(train: bool, *modules: torch.nn.Module) -> None:
    for m in modules:
        m.train(train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", MODELS)
def test_ladder(name: str, train: bool) -> None:
    # a copy: a train-mode test moves running statistics, which the next test must not see
    model, inputs, pruner = copy.deepcopy(prepared(name))
    _set_mode(train, model, pruner)
    full = {g.index: g.size for g in pruner.grouping.prunable}
    assert pruner.grouping.prunable, "every ladder model has something to prune"

    # 1. all masks at one, full widths: both branches are the original model
    pruner.set_widths(full)
    with torch.no_grad():
        reference = model(*inputs)
        if train:
            soft, hard = pruner(*inputs)  # train mode: both branches
        else:
            soft, hard = pruner.soft_forward(*inputs), pruner(*inputs)
    assert rel_err(soft, reference) < TOL
    assert rel_err(hard, reference) < TOL
    assert pruner.flops_ratio() == pytest.approx(1.0)

    # 2-3. random widths and random kept channels
    for seed in range(1 if train else 2):  # train mode: one draw keeps the suite short
        widths, keep = random_keep(pruner, seed)
        pruner.set_widths(widths, keep)
        emitted = pruner.export().train(train)
        with torch.no_grad():
            out = emitted(*inputs)
            hard = pruner.hard_forward(*inputs)
            masked = pruner.masked_forward(*inputs)
        assert rel_err(hard, out) < TOL, f"seed {seed}: emitted != hard"
        if name not in LAYER_NORM_OVER_PRUNED:
            assert rel_err(masked, out) < EMULATION_TOL, f"seed {seed}: emitted != masked emulation"
        measured = count_flops(emitted, inputs)
        assert pruner.flops() == pytest.approx(measured, rel=1e-9)
        assert pruner.flops_model(widths) == pytest.approx(measured, rel=1e-9)
        smaller = sum(p.numel() for p in emitted.parameters())
        if any(w < full[g] for g, w in widths.items()):
            assert smaller < sum(p.numel() for p in model.parameters())

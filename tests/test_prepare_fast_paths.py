"""The prepare pass's vectorised pieces agree with their plain definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import s2h_fx
from s2h_fx.importance import Importance
from s2h_fx.passes.plan_surgery import kept_ids
from s2h_fx.rules.base import _get_attr

import toy_zoo


def _grouping(model: torch.nn.Module, x: torch.Tensor):  # noqa: ANN202
    return s2h_fx.prune_graph(model.eval(), 0.6, example_inputs=(x,), divisor=1)


@pytest.mark.parametrize("factory", [toy_zoo.Residual, toy_zoo.CatSplit, toy_zoo.Grouped])
def test_kept_ids_is_membership_of_the_kept_classes(factory) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    pruner = _grouping(factory(), toy_zoo.image())
    grouping = pruner.grouping
    rng = np.random.default_rng(0)
    prunable = [g.index for g in grouping.prunable]
    assert prunable
    for trial in range(5):
        # a random keep-set per group; in one trial one group is left out entirely
        keep = {g: np.sort(rng.choice(grouping.groups[g].size,
                                      rng.integers(1, grouping.groups[g].size + 1),
                                      replace=False)) for g in prunable}
        if trial == 4:
            keep.pop(prunable[0])
        got = kept_ids(grouping, keep)
        for i, (g, c) in enumerate(zip(grouping.group_of_id, grouping.class_of_id)):
            want = True if g < 0 else (g in keep and c in set(keep[g].tolist()))
            assert got[i] == want, (i, g, c)


def test_importance_is_mean_normalised_l1_of_the_producers() -> None:
    torch.manual_seed(0)
    pruner = _grouping(toy_zoo.Residual(), toy_zoo.image())
    model = pruner.graph_module
    with torch.no_grad():  # weights of unequal scale, so the normalisation matters
        for p in model.parameters():
            p.mul_(torch.rand_like(p) * 3)
    scores = Importance(pruner.grouping).scores(model)
    grouping = pruner.grouping
    for g in grouping.prunable:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for path, axis in g.producers:
            w = _get_attr(model, path).detach().double()
            ids = grouping.slots[(path, axis)]
            l1 = w.abs().sum(dim=[d for d in range(w.dim()) if d != axis]) if w.dim() > 1 \
                else w.abs()
            pos = np.flatnonzero(grouping.group_of_id[ids] == g.index)
            cls = grouping.class_of_id[ids[pos]]
            mult = np.bincount(cls, minlength=g.size)[cls]
            part = l1[torch.as_tensor(pos)]
            part = part / part.mean()
            acc.index_add_(0, torch.as_tensor(cls), part / torch.as_tensor(mult))
        want = acc / len(g.producers)
        torch.testing.assert_close(scores[g.index].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_importance_of_double_and_half_models(dtype: torch.dtype) -> None:
    """The norm is taken at float32 or wider (a float64 model is not narrowed)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3)).to(dtype)
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(torch.randn(2, 3, 8, 8,
                                                                        dtype=dtype),))
    scores = Importance(pruner.grouping).scores(pruner.graph_module)
    (group,) = pruner.grouping.prunable
    w = pruner.graph_module.get_submodule("0").weight.detach().double()
    l1 = w.abs().sum(dim=(1, 2, 3))
    torch.testing.assert_close(scores[group.index].double(), l1 / l1.mean(), rtol=1e-5,
                               atol=1e-6)


def test_collector_paused_only_inside_and_restored(tmp_path) -> None:  # noqa: ANN001
    """prune_graph and export pause the cyclic collector and put it back as it was, also
    after an error; a latency budget's measurements run with it on (they deploy whole
    networks, whose cycles should be collected)."""
    import gc

    from test_latency_model import Chain, FakeMeasure, X, by_hand

    class Watching(FakeMeasure):
        seen: list[bool] = []

        def layer(self, spec, sizes):  # noqa: ANN001, ANN201
            self.seen.append(gc.isenabled())
            return super().layer(spec, sizes)

    assert gc.isenabled()
    measure = Watching(by_hand(16, 32, 16) + 2e-4)  # a small remainder: 0.6 can be met
    pruner = s2h_fx.prune_graph(Chain().eval(), {"latency": 0.6, "runtime": "eager",
                                                  "cache_dir": str(tmp_path)},
                                example_inputs=(X,), latency_measure=measure,
                                divisor=8)  # the chain's steps (test_latency_model)
    assert measure.seen and all(measure.seen)
    assert gc.isenabled()
    pruner.export()
    assert gc.isenabled()
    with pytest.raises(s2h_fx.NoPrunableChannelsError):
        s2h_fx.prune_graph(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), 0.5,
                           example_inputs=(torch.randn(1, 3, 8, 8),))
    assert gc.isenabled()
    gc.disable()
    try:
        pruner.export()
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def test_plan_refuses_class_indices_out_of_range() -> None:
    from s2h_fx.errors import InvariantError
    from s2h_fx.passes.plan_surgery import plan_surgery

    torch.manual_seed(0)
    pruner = _grouping(toy_zoo.Residual(), toy_zoo.image())
    g = pruner.grouping.prunable[0]
    for bad in ([0, g.size], [-1, 0]):
        with pytest.raises(InvariantError, match="class indices must be in"):
            plan_surgery(pruner.graph_module, pruner.grouping, {g.index: np.array(bad)})

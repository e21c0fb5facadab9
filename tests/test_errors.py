"""Bad input gets a clear error that names the problem."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import s2h_fx

from toy_zoo import Residual, cbr

X = torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("budget", [0, -0.1, 1.0001, 2, math.nan, math.inf, "0.5", None, True,
                                    {"paramz": 0.5}, {"latency": 0.5}])
def test_bad_budget(budget: object) -> None:
    with pytest.raises(s2h_fx.BudgetError, match="budget"):
        s2h_fx.prune_graph(Residual(), budget, example_inputs=(X,))  # type: ignore[arg-type]


def test_budget_forms_accepted() -> None:
    assert s2h_fx.PruneConfig({"flops": 0.5}).budget == 0.5
    assert s2h_fx.PruneConfig(1).budget == 1.0


def test_missing_example_inputs() -> None:
    with pytest.raises(s2h_fx.InputError, match="example_inputs"):
        s2h_fx.prune_graph(Residual(), 0.5)
    with pytest.raises(s2h_fx.InputError, match="example_inputs"):
        s2h_fx.prune_graph(Residual(), 0.5, example_inputs=())


def test_wrong_shape_names_the_node() -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(s2h_fx.InputError, match=r"conv1.*example_inputs") as info:
        s2h_fx.prune_graph(model, 0.5, example_inputs=(torch.randn(1, 1, 32, 32),))
    assert "expected input" in str(info.value) or "channels" in str(info.value)


def test_too_many_inputs() -> None:
    with pytest.raises(s2h_fx.InputError, match="2 example inputs"):
        s2h_fx.prune_graph(Residual(), 0.5, example_inputs=(X, X))


def test_all_groups_frozen_lists_why() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())  # its only group is the output
    with pytest.raises(s2h_fx.NoPrunableChannelsError, match="reaches a model output"):
        s2h_fx.prune_graph(model, 0.5, example_inputs=(X,))


class FrozenHeavy(nn.Module):
    """Most FLOPs sit in a conv whose channels reach the output."""

    def __init__(self) -> None:
        super().__init__()
        self.small = cbr(3, 16)
        self.big = nn.Conv2d(16, 64, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(self.small(x))


def test_budget_below_frozen_cost() -> None:
    with pytest.raises(s2h_fx.BudgetError, match="frozen part alone costs"):
        s2h_fx.prune_graph(FrozenHeavy(), 0.1, example_inputs=(X,))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


def test_untraceable_model_names_the_line() -> None:
    with pytest.raises(s2h_fx.TraceError) as info:
        s2h_fx.prune_graph(Untraceable(), 0.5, example_inputs=(X,))
    message = str(info.value)
    assert "test_errors.py" in message and "if x.sum() > 0" in message
    assert "leaf" in message and "concrete_args" in message


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        s2h_fx.prune_graph(lambda x: x, 0.5, example_inputs=(X,))  # type: ignore[arg-type]


def test_user_model_is_not_modified() -> None:
    model = Residual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(X,))
    pruner.train()
    pruner(X)
    pruner.export()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def test_bad_widths() -> None:
    pruner = s2h_fx.prune_graph(Residual(), 1.0, example_inputs=(X,))
    with pytest.raises(ValueError, match="multiple of 8"):
        pruner.set_widths({0: 12})
    with pytest.raises(ValueError, match="not prunable groups"):
        pruner.set_widths({5: 8})


def _small_pruner() -> s2h_fx.Pruner:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    return s2h_fx.prune_graph(model, 0.5, example_inputs=(torch.randn(2, 3, 8, 8),))


@pytest.mark.parametrize("data, match", [
    ([], "no batches"),
    (iter([]), "yielded no batches"),
    ([{"x": torch.randn(2, 3, 8, 8), "y": torch.zeros(2, dtype=torch.long)}],
     "got a dict"),
    ([torch.randn(2, 3, 8, 8)], "got a Tensor"),
    ([(torch.randn(2, 3, 8, 8),)], "tuple of length 1"),
    ([(torch.randn(2, 3, 8, 8), [0, 1])], r"\(Tensor, list\)"),
])
def test_fit_bad_batches(data: object, match: str) -> None:
    pruner = _small_pruner()
    with pytest.raises(s2h_fx.InputError, match=match):
        pruner.fit(data, epochs=1, progress=False)  # type: ignore[arg-type]


def test_backward_names_missing_loss_terms() -> None:
    pruner = _small_pruner().train()
    soft, hard = pruner(torch.randn(2, 3, 8, 8))
    losses = pruner.losses((soft, hard), torch.zeros(2, dtype=torch.long))
    del losses["kd_soft"]
    with pytest.raises(s2h_fx.InputError, match="kd_soft"):
        pruner.backward(losses)

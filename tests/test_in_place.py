"""An in-place op whose result is not used is still part of the network: torch.fx's
dead-code elimination removed ``h.relu_()`` written as a statement (the graph then
computed without the ReLU, silently)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import s2h_fx

from helpers import rel_err


class Statements(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.form == "method":
            h.relu_()
        elif self.form == "function":
            torch.relu_(h)
        else:
            h.clamp_(min=0.0).mul_(2.0)
        return self.b(h).mean((2, 3))


@pytest.mark.parametrize("form", ["method", "function", "chain"])
def test_in_place_statements_stay_in_the_graph(form: str) -> None:
    torch.manual_seed(0)
    model, x = Statements(form).eval(), torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < 1e-6
    pruner.set_widths({g.index: g.size // 2 for g in pruner.grouping.prunable})
    exported = pruner.export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < 1e-5
        assert (exported.get_submodule("a")(x) < 0).any()  # the ReLU is not in the conv

"""flip over a token axis or a channel axis keeps the channels prunable and exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import s2h_fx

from helpers import count_flops, rel_err


class Flips(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(16, 24), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))  # (B, N, 16)
        if self.how == "tokens":
            h = h + h.flip(1)  # reverse the sequence: channels untouched
        elif self.how == "channels":
            h = torch.flip(h, dims=[-1]) * h  # channel i meets channel 15 - i
        else:
            h = torch.flip(h, [0, 2])  # batch and channels
        return self.head(torch.relu(self.b(h))).mean(1)


@pytest.mark.parametrize("how", ["tokens", "channels", "batch_and_channels"])
def test_flip_is_followed_exactly(how: str) -> None:
    torch.manual_seed(0)
    model, x = Flips(how).eval(), torch.randn(3, 5, 6)
    pruner = s2h_fx.prune_graph(model, 0.6, example_inputs=(x,), divisor=4)
    assert not pruner.grouping.unknown_ops
    a_group = [g for g in pruner.grouping.groups if "a:out" in g.members]
    assert a_group and a_group[0].prunable
    with torch.no_grad():
        assert rel_err(s2h_fx.prune_graph(model, 1.0, example_inputs=(x,)).eval()(x),
                       model(x)) < 1e-6
    # channel i is multiplied by channel 15 - i: those pairs are one class
    size = 8 if how == "channels" else 16
    assert a_group[0].size == size
    pruner.set_widths({**pruner.widths, a_group[0].index: size // 2})
    pruned = pruner.eval().export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < 1e-5
    assert pruned.get_submodule("a").weight.shape[0] == 8
    (axis, kept), = pruner.plan.params["a.weight"]
    kept_rows = set(kept.tolist())
    if how == "channels":
        assert kept_rows == {15 - i for i in kept_rows}
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)

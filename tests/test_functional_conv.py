"""A functional grouped conv whose groups is a constant follows the pruned channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx

from helpers import count_flops, rel_err


class Blur(nn.Module):
    """timm's anti-aliasing downsample: a fixed depthwise filter as a buffer,
    ``F.conv2d(x, filt, groups=channels)`` with the channel count as a constant."""

    def __init__(self, channels: int, as_kwarg: bool) -> None:
        super().__init__()
        self.channels, self.as_kwarg = channels, as_kwarg
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (k[:, None] * k[None, :] / 16).expand(channels, 1, 3, 3)
                             .contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        if self.as_kwarg:
            return F.conv2d(x, self.filt, stride=2, groups=self.channels)
        return F.conv2d(x, self.filt, None, 2, 0, 1, self.channels)


class Net(nn.Module):
    def __init__(self, as_kwarg: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.blur = Blur(32, as_kwarg)
        self.b = nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.blur(self.a(x)))).mean((2, 3))


@pytest.mark.parametrize("as_kwarg", [True, False])
def test_functional_depthwise_groups_follow_the_pruned_channels(as_kwarg: bool) -> None:
    torch.manual_seed(0)
    model, x = Net(as_kwarg).eval(), torch.randn(2, 3, 16, 16)
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    group = next(g for g in pruner.grouping.prunable if "a:out" in g.members)
    pruner.set_widths({**pruner.widths, group.index: 8})
    pruned = pruner.eval().export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < 1e-5
    assert pruned.get_submodule("blur").filt.shape == (8, 1, 3, 3)
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)

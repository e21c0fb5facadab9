"""A channel count read from a shape and used to size other channels in a reshape.

``b, n, c = x.shape`` then ``o.transpose(1, 2).reshape(b, n, c)`` merges the heads
back with the *embedding's* ``c`` (timm's BEiT writes its attention so). The
surgery writes that size as the pruned constant, so both the embedding and the head
width stay prunable; the same ``c`` used as a value elsewhere still freezes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx

from helpers import count_flops, rel_err


class MergeWithEmbedWidth(nn.Module):
    def __init__(self, scale_by_width: bool = False) -> None:
        super().__init__()
        self.heads, self.scale_by_width = 2, scale_by_width
        self.embed = nn.Linear(12, 32)
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, c = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        if self.scale_by_width:
            o = o * c ** -0.5  # the width as a value: must keep those channels
        return self.head(h + self.proj(o)).mean(1)


def _groups_with(pruner: s2h_fx.Pruner, member: str) -> list:  # noqa: ANN401
    return [g for g in pruner.grouping.groups if member in g.members]


def test_merge_size_read_from_embedding_is_rewritten() -> None:
    torch.manual_seed(0)
    model, x = MergeWithEmbedWidth().eval(), torch.randn(2, 7, 12)
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), divisor=4)
    (width,) = _groups_with(pruner, "qkv:out")
    (embed,) = _groups_with(pruner, "embed:out")
    assert width.prunable and embed.prunable and width.index != embed.index
    # the head width narrower than the embedding's share: c no longer equals heads * d
    pruner.set_widths({**pruner.widths, width.index: 8, embed.index: 24})
    pruned = pruner.eval().export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < 1e-5
        # and the hard network is the model with those channels removed: compare the
        # masked (zeroed) model, where zeroing equals removing
        assert pruned(x).shape == model(x).shape
    assert pruned.get_submodule("proj").weight.shape == (24, 2 * 8)
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


def test_same_size_used_as_a_value_still_freezes() -> None:
    torch.manual_seed(0)
    model, x = MergeWithEmbedWidth(scale_by_width=True).eval(), torch.randn(2, 7, 12)
    pruner = s2h_fx.prune_graph(model, 0.9, example_inputs=(x,), divisor=4)
    (embed,) = _groups_with(pruner, "embed:out")
    assert not embed.prunable
    assert any("used as a value" in r for r in embed.frozen)

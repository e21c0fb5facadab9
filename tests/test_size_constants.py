"""A channel count read from a shape and used to size other channels in a reshape.

``b, n, c = x.shape`` then ``o.transpose(1, 2).reshape(b, n, c)`` merges the heads
back with the *embedding's* ``c`` (timm's BEiT writes its attention so). The
surgery writes that size as ``-1`` (the reshape's one size of other channels), so
both the embedding and the head width stay prunable, at any batch or token count;
the same ``c`` used as a value elsewhere still freezes.
"""

from __future__ import annotations

import numpy as np
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
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), divisor=4, attention="width")
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


def test_exported_graph_follows_other_batch_and_token_counts() -> None:
    torch.manual_seed(0)
    model, x = MergeWithEmbedWidth().eval(), torch.randn(2, 7, 12)
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), divisor=4, attention="width")
    (width,) = _groups_with(pruner, "qkv:out")
    (embed,) = _groups_with(pruner, "embed:out")
    pruner.set_widths({**pruner.widths, width.index: 8, embed.index: 24})
    pruned = pruner.eval().export(enforce_budget=False)
    big = torch.randn(5, 9, 12)  # another batch and token count than traced
    with torch.no_grad():
        out = pruned(big)
        assert out.shape == (5, 5)
        assert rel_err(out[:2], pruned(big[:2])) < 1e-5  # rows do not mix


class MergedBatchChannels(nn.Module):
    """``(B, C, L).reshape(-1, L)`` merges the batch into the channel axis: a size read
    from it depends on the batch and must stay a graph value."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(4, 16, 1), nn.Conv1d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n = x.shape
        z = self.c1(x).reshape(-1, n)  # (B * 16, L)
        z = z.view(z.size(0), -1).softmax(-1)
        return self.c2(z.view(b, -1, n))


def test_a_size_of_channels_merged_with_the_batch_is_not_baked_in() -> None:
    torch.manual_seed(0)
    model, x = MergedBatchChannels().eval(), torch.randn(2, 4, 5)
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), divisor=4)
    pruned = pruner.eval().export(enforce_budget=False)
    big = torch.randn(4, 4, 5)
    with torch.no_grad():
        assert rel_err(pruned(big)[:2], pruned(big[:2])) < 1e-6
        assert rel_err(pruned(big), pruner(big)) < 1e-5


class SpatialReduction(nn.Module):
    """PVTv2's spatial reduction: ``sr(h).reshape(B, C, -1)`` with ``C`` read from the
    block input ``h``, while ``sr`` is a conv with channels of its own."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.embed = nn.Conv2d(3, 16, 1)
        self.sr = nn.Conv2d(16, 16, 2, stride=2)
        self.head = nn.Linear(24 if form == "scaled" else 32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.embed(x))
        if self.form == "unpacked":
            B, C, H, W = h.shape
        else:
            B, C = h.size(0), h.size(1)
        if self.form == "scaled":  # a count used as another value: not a tie
            r = self.sr(h).reshape(B, C // 2, -1)
        else:
            r = self.sr(h).reshape(B, C, -1)
        return self.head(torch.cat([r.mean(2), h.mean((2, 3))], 1))


@pytest.mark.parametrize("form", ["unpacked", "size-method"])
def test_a_count_of_other_channels_sizing_a_reshape_with_its_minus_one_ties_them(
        form: str) -> None:
    torch.manual_seed(0)
    model, x = SpatialReduction(form).eval(), torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    [g] = [g for g in pruner.grouping.prunable if "sr:out" in g.members]
    assert "embed:out" in g.members and g.size == 16, pruner.grouping.table()
    # which classes are sr's out channels 0..15 and embed's: tied position by position
    gr = pruner.grouping
    sr_cls = gr.class_of_id[gr.slots[("sr.weight", 0)]]
    embed_cls = gr.class_of_id[gr.slots[("embed.weight", 0)]]
    assert (sr_cls == embed_cls).all()
    keep = np.array([1, 2, 5, 8, 11, 12, 14, 15])
    pruner.set_widths({g.index: 8}, {g.index: np.sort(sr_cls[keep])})
    pruned = pruner.export(enforce_budget=False).eval()
    idx = torch.as_tensor(keep)
    with torch.no_grad():
        h = F.relu(F.conv2d(x, model.embed.weight[idx], model.embed.bias[idx]))
        r = F.conv2d(h, model.sr.weight[idx][:, idx], model.sr.bias[idx], stride=2)
        cols = torch.cat([idx, 16 + idx])
        ref = F.linear(torch.cat([r.flatten(2).mean(2), h.mean((2, 3))], 1),
                       model.head.weight[:, cols], model.head.bias)
        assert rel_err(pruned(x), ref) < 1e-5
        assert rel_err(pruned(x), pruner(x)) < 1e-5
        assert rel_err(ref, model(x)) > 1e-3
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


def test_a_count_used_through_arithmetic_is_not_tied() -> None:
    """``C // 2`` is not a count of channels one per position: both stay frozen."""
    model, x = SpatialReduction("scaled").eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(s2h_fx.NoPrunableChannelsError, match="used as a value"):
        s2h_fx.prune_graph(model, 1.0, (x,))

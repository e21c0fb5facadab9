"""Ops that return or take tuples of tensors: a slice of a split's parts joined again
(``torch.cat(x.chunk(4, 1)[2:], 1)``), a split's parts passed whole to ``cat``,
``max``/``min`` along a dim (values and indices, ``.values``), and windows cut by
``unfold`` / ``F.unfold``. Their channels must reach their consumers: before, a tuple
slice or a whole tuple lost them, so the consumer's input was never sliced and the
pruned network failed to run. Each form: exported == hard on random keep sets, FLOPs
model == flop_counter, and a hand-sliced reference where one is short to write."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx

from helpers import check_random_keeps, random_keep, rel_err

FORMS = ["chunk-slice", "chunk-whole", "max-values", "min-function", "max-getitem",
         "unfold-method", "im2col-module", "im2col-function"]


class Net(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a = nn.Conv2d(3, 64, 1)
        width = {"chunk-slice": 32, "im2col-module": 64 * 9, "im2col-function": 64 * 4}
        self.b = nn.Linear(width.get(form, 64), 16)
        self.c = nn.Linear(16, 3)
        self.unfold = nn.Unfold(3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        if self.form == "chunk-slice":
            z = torch.cat(h.chunk(4, 1)[2:], 1).mean((2, 3))
        elif self.form == "chunk-whole":
            z = torch.cat(h.chunk(2, 1)[::-1], 1).mean((2, 3))
        elif self.form == "max-values":
            z = h.flatten(2).max(dim=-1, keepdim=True).values.squeeze(-1)
        elif self.form == "min-function":
            z = torch.min(h.flatten(2), 2).values
        elif self.form == "max-getitem":
            z = h.flatten(2).max(2)[0]
        elif self.form == "unfold-method":  # 4x4 windows over H and W
            z = h.unfold(2, 4, 4).unfold(3, 4, 4).mean((2, 3, 4, 5))
        elif self.form == "im2col-module":
            z = self.unfold(h).mean(2)
        else:
            z = F.unfold(h, 2, stride=2).mean(2)
        return self.c(F.relu(self.b(z)))


@pytest.mark.parametrize("form", FORMS)
def test_channels_through_tuples_and_windows_reach_their_consumers(form: str) -> None:
    torch.manual_seed(0)
    model, x = Net(form).eval(), torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < 1e-5
    consumers = [g for g in pruner.grouping.prunable if "b:in" in g.members]
    assert consumers and all(any("a:out" in m for m in g.members) for g in consumers), \
        pruner.grouping.table()
    check_random_keeps(pruner, (x,))


def test_im2col_rows_follow_their_channel() -> None:
    """F.unfold's rows of channel c (c·9 .. c·9 + 8) are kept with it: against a network
    sliced by hand."""
    torch.manual_seed(1)
    model, x = Net("im2col-module").eval(), torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    [g] = [g for g in pruner.grouping.prunable if "a:out" in g.members]
    gr = pruner.grouping
    cls = gr.class_of_id[gr.slots[("a.weight", 0)]]
    keep = np.sort(np.random.default_rng(0).permutation(64)[:24])
    keeps = {h.index: np.arange(h.size) for h in gr.prunable}
    keeps[g.index] = np.sort(cls[keep])
    pruner.set_widths({h: len(k) for h, k in keeps.items()}, keeps)
    pruned = pruner.export(enforce_budget=False).eval()
    idx = torch.as_tensor(keep)
    rows = (idx[:, None] * 9 + torch.arange(9)).reshape(-1)
    with torch.no_grad():
        h = F.relu(F.conv2d(x, model.a.weight[idx], model.a.bias[idx]))
        z = F.unfold(h, 3, padding=1).mean(2)
        ref = model.c(F.relu(F.linear(z, model.b.weight[:, rows], model.b.bias)))
        assert rel_err(pruned(x), ref) < 1e-5
        assert rel_err(ref, model(x)) > 1e-3


@pytest.mark.parametrize("op", ["max", "unfold"])
def test_along_the_channel_axis_freezes(op: str) -> None:
    class Along(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 16), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            z = h.reshape(-1, 4, 4).max(1).values if op == "max" else h.unfold(1, 4, 4).mean(1)
            return self.b(z)

    with pytest.raises(s2h_fx.NoPrunableChannelsError, match=r"a:out"):
        s2h_fx.prune_graph(Along(), 1.0, (torch.randn(5, 6),))


class Odd(nn.Module):
    """Forms that must freeze (or prune exactly), never crash or drop channels."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a = nn.Conv2d(3, 32, 1)
        self.t = nn.Parameter(torch.randn(64, 4))
        self.b = nn.Linear(128 if form == "indices-as-index" else 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.form == "indices-as-index":  # the argmax's channels used as positions
            return self.b(self.t[h.flatten(2).max(2).indices].flatten(1))
        if self.form == "slice-from-a-size":  # a tuple slice bounded by a channel count
            return self.b(torch.cat(h.chunk(4, 1)[h.shape[1] // 16:], 1).mean((2, 3)))
        if self.form == "tensor-split":  # positions that surgery would not rewrite
            return self.b(torch.tensor_split(h, (8, 24), 1)[1].mean((2, 3)))
        return self.b(torch.max(input=h.flatten(2), dim=2).values[:, :16])  # keywords


@pytest.mark.parametrize("form", ["indices-as-index", "slice-from-a-size", "tensor-split"])
def test_channels_used_as_positions_freeze(form: str) -> None:
    model, x = Odd(form).eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(s2h_fx.NoPrunableChannelsError, match="a:out"):
        s2h_fx.prune_graph(model, 1.0, (x,), divisor=1)


def test_max_with_keyword_input() -> None:
    model, x = Odd("keywords").eval(), torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), divisor=4).eval()
    assert any("a:out" in g.members for g in pruner.grouping.prunable), pruner.grouping.table()
    for seed in range(3):
        pruner.set_widths(*random_keep(pruner, seed))
        with torch.no_grad():
            assert rel_err(pruner.export(enforce_budget=False)(x), pruner(x)) < 1e-5

"""Norms written with ``var`` / ``std`` (timm's ``simple_norm``, a LayerNorm over a
feature map's channels written out by hand, EvoNorm's spatial variance): a variance
over the channels (alone or with other axes) is a statistic of the kept ones, as a mean
is, so the channels prune
and the pruned network's variance is taken over what it keeps. Each form is checked
against a network sliced by hand, and exported == hard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx

from helpers import count_flops, rel_err

C, KEPT, EPS = 16, 8, 1e-5


def _norm(form: str, h: torch.Tensor) -> torch.Tensor:
    """The forms, on (B, C, H, W); the statistic over axis 1 (or 2, 3: spatial)."""
    if form == "simple-norm":  # timm's simple_norm, over channels moved last
        t = h.permute(0, 2, 3, 1)
        t = t * torch.rsqrt(torch.var(t, dim=(-1,), keepdim=True) + EPS)
        return t.permute(0, 3, 1, 2)
    if form == "layernorm2d":  # (x - mean) / sqrt(var + eps), biased
        mu = h.mean(1, keepdim=True)
        return (h - mu) / torch.sqrt(h.var(1, keepdim=True, unbiased=False) + EPS)
    if form == "std-positional":  # x.std(dim, unbiased, keepdim)
        return h / (h.std(1, True, True) + EPS)
    if form == "correction":
        return h * torch.rsqrt(torch.var(h, 1, correction=0, keepdim=True) + EPS)
    if form == "all-axes":  # one statistic over channels and space (GroupNorm, one group)
        return h / (h.var(dim=(1, 2, 3), keepdim=True) + EPS)
    if form == "unbiased-only":  # x.var(False): over every axis, the batch included
        return h / (h.var(False) + EPS)
    assert form == "spatial"  # EvoNorm's variance over the spatial axes: channels pass
    return h / h.var(dim=(2, 3), unbiased=False, keepdim=True).add(EPS).sqrt()


class Net(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Conv2d(3, C, 3, padding=1), nn.Conv2d(C, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(_norm(self.form, self.a(x))))


@pytest.mark.parametrize("form", ["simple-norm", "layernorm2d", "std-positional", "correction",
                                  "all-axes", "unbiased-only", "spatial"])
def test_variance_over_channels_is_taken_over_the_kept_ones(form: str) -> None:
    torch.manual_seed(0)
    model, x = Net(form).eval(), torch.randn(2, 3, 6, 6)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < 1e-5
    [g] = [h for h in pruner.grouping.groups if "a:out" in h.members]
    assert g.prunable and g.size == C, pruner.grouping.table()
    keep = np.sort(np.random.default_rng(2).permutation(C)[:KEPT])
    pruner.set_widths({g.index: KEPT}, {g.index: keep})
    exported = pruner.export(enforce_budget=False).eval()
    idx = torch.as_tensor(keep)
    with torch.no_grad():
        h = F.conv2d(x, model.a.weight[idx], model.a.bias[idx], padding=1)
        ref = F.conv2d(F.relu(_norm(form, h)), model.b.weight[:, idx], model.b.bias)
        out = exported(x)
        assert rel_err(out, ref) < 1e-5
        assert rel_err(out, pruner(x)) < 1e-5
        assert rel_err(out, model(x)) > 1e-3
    assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


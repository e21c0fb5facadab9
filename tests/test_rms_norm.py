"""RMSNorm (torch's module and function, timm's RmsNorm layer and its functions):
pruned as LayerNorm is, channel by channel over the last axis, the pruned layer's root
mean square taken over the channels it keeps. Each form is checked against that
reference built by hand from the sliced weights, and exported == hard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx

from helpers import count_flops, rel_err

C, KEPT = 16, 8
FORMS = ["module", "function", "function-kwargs", "function-cast", "function-to-dtype", "timm"]


def _timm_rms_norm() -> nn.Module:
    timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")
    return timm.layers.RmsNorm(C)


class Tokens(nn.Module):
    """linear -> RMSNorm over the channels -> GELU -> linear, on (B, N, C) tokens."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Linear(10, C), nn.Linear(C, 4)
        self.norm = _timm_rms_norm() if form == "timm" else nn.RMSNorm(C, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.form == "function":
            h = F.rms_norm(h, (C,), self.norm.weight, 1e-6)
        elif self.form == "function-cast":  # the weight read through a cast (DeepSeek ViT)
            h = F.rms_norm(h.float(), (C,), weight=self.norm.weight.float(), eps=1e-6)
        elif self.form == "function-to-dtype":  # cast to the input's dtype, read in the graph
            h = F.rms_norm(h, (C,), self.norm.weight.to(h.dtype), 1e-6)
        elif self.form == "function-kwargs":
            h = F.rms_norm(h, normalized_shape=(C,), weight=self.norm.weight, eps=1e-6)
        else:
            h = self.norm(h)
        return self.b(F.gelu(h))


@pytest.mark.parametrize("form", FORMS)
def test_rms_norm_prunes_channel_by_channel(form: str) -> None:
    torch.manual_seed(0)
    model = Tokens(form).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < 1e-5
    [g] = [h for h in pruner.grouping.groups if "a:out" in h.members]
    assert g.prunable and g.size == C and g.atom == 1, pruner.grouping.table()
    keep = np.sort(np.random.default_rng(0).permutation(C)[:KEPT])
    pruner.set_widths({g.index: KEPT}, {g.index: keep})
    exported = pruner.export(enforce_budget=False).eval()
    idx = torch.as_tensor(keep)
    with torch.no_grad():
        h = F.linear(x, model.a.weight[idx], model.a.bias[idx])
        h = F.rms_norm(h, (KEPT,), model.norm.weight[idx], model.norm.eps)
        ref = F.linear(F.gelu(h), model.b.weight[:, idx], model.b.bias)
        out = exported(x)
        assert rel_err(out, pruner(x)) < 1e-5
        assert rel_err(out, ref) < 1e-5
        assert rel_err(out, model(x)) > 1e-3  # fewer channels: another function
    assert exported.get_parameter("norm.weight").shape == (KEPT,)
    if form == "module":  # a leaf: its attribute follows (timm's layer is traced through)
        assert tuple(exported.get_submodule("norm").normalized_shape) == (KEPT,)
    assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


def test_rms_norm_over_two_axes_freezes() -> None:
    """Statistics over the channels and another axis: pruning the channels would change
    which positions share a root mean square, so the channels are kept whole."""

    class TwoAxes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(10, C), nn.Linear(C, 4)
            self.norm = nn.RMSNorm((5, C))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.norm(self.a(x)))

    with pytest.raises(s2h_fx.NoPrunableChannelsError, match="reduced over the channel axis at norm"):
        s2h_fx.prune_graph(TwoAxes(), 1.0, (torch.randn(2, 5, 10),))


@pytest.mark.parametrize("norm", [nn.RMSNorm, nn.LayerNorm])
def test_norm_without_affine_parameters_is_resized(norm: type[nn.Module]) -> None:
    """A norm with nothing of its own to slice still gets its normalized_shape from the
    narrowed input (export used to leave it at the full width)."""

    class NoAffine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.n, self.b = nn.Linear(10, C), norm(C, elementwise_affine=False), nn.Linear(C, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.n(self.a(x)))

    torch.manual_seed(0)
    model, x = NoAffine().eval(), torch.randn(2, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    [g] = pruner.grouping.prunable
    keep = np.arange(1, C, 2)
    pruner.set_widths({g.index: len(keep)}, {g.index: keep})
    exported = pruner.export(enforce_budget=False)
    assert tuple(exported.get_submodule("n").normalized_shape) == (len(keep),)
    idx = torch.as_tensor(keep)
    with torch.no_grad():
        h = F.linear(x, model.a.weight[idx], model.a.bias[idx])
        ref = F.linear(norm(len(keep), elementwise_affine=False)(h), model.b.weight[:, idx], model.b.bias)
        assert rel_err(exported(x), ref) < 1e-5
        assert rel_err(exported(x), pruner(x)) < 1e-5



@pytest.mark.parametrize("square", ["method", "operator", "torch.pow", "timm"])
def test_rms_norm_over_conv_channels_written_with_pow(square: str) -> None:
    """An RMS norm over a feature map's channels written out with ``pow`` (timm's
    ``RmsNorm2d``, MobileNetV5's norm: ``x.pow(2)``, then a mean over dim 1): ``pow`` has
    a rule (it had none, and froze every channel it touched), and the mean is taken over
    the kept channels, as a hand-sliced network computes it."""

    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, C, 3, padding=1), nn.Conv2d(C, 4, 1)
            if square == "timm":
                timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")
                self.norm = timm.layers.RmsNorm2d(C, eps=1e-6)
            else:
                self.weight = nn.Parameter(torch.empty(C).uniform_(0.5, 1.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if square == "timm":
                return self.b(self.norm(h))
            v = {"method": lambda t: t.pow(2), "operator": lambda t: t ** 2,
                 "torch.pow": lambda t: torch.pow(t, 2)}[square](h)
            h = h * torch.rsqrt(v.mean(dim=1, keepdim=True) + 1e-6)
            return self.b(h * self.weight.reshape(1, -1, 1, 1))

    torch.manual_seed(0)
    model, x = Conv().eval(), torch.randn(2, 3, 6, 6)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    [g] = [h for h in pruner.grouping.groups if "a:out" in h.members]
    assert g.prunable and g.size == C, pruner.grouping.table()
    keep = np.sort(np.random.default_rng(1).permutation(C)[:KEPT])
    pruner.set_widths({g.index: KEPT}, {g.index: keep})
    exported = pruner.export(enforce_budget=False).eval()
    idx = torch.as_tensor(keep)
    weight = model.norm.weight if square == "timm" else model.weight
    eps = model.norm.eps if square == "timm" else 1e-6
    with torch.no_grad():
        h = F.conv2d(x, model.a.weight[idx], model.a.bias[idx], padding=1)
        h = h * torch.rsqrt((h * h).mean(1, keepdim=True) + eps) * weight[idx].reshape(1, -1, 1, 1)
        ref = F.conv2d(h, model.b.weight[:, idx], model.b.bias)
        out = exported(x)
        assert rel_err(out, ref) < 1e-5
        assert rel_err(out, pruner(x)) < 1e-5
        assert rel_err(out, model(x)) > 1e-3
    assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


def test_pow_of_two_tensors_couples_them() -> None:
    """``a ** b`` with both tensors carrying channels pairs them as any element-wise op."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, C), nn.Linear(6, C), nn.Linear(C, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.sigmoid(self.a(x)) ** torch.sigmoid(self.b(x)))

    pruner = s2h_fx.prune_graph(Two(), 1.0, (torch.randn(4, 6),))
    [g] = pruner.grouping.prunable
    assert {"a:out", "b:out"} <= set(g.members)

"""Regression tests of issue 8's timm coverage: patterns of timm models whose channels
were frozen (or whose rule crashed) though they can be followed exactly. Each is a toy
module with the model's pattern; each checks that prune_graph works at budget 0.5, that
the exported graph equals the hard network (rel < 1e-5) for random keep-sets, and that
the exported FLOPs (flop_counter) are those the FLOPs model counts and within budget."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
from torch import fx, nn

import s2h_fx
from s2h_fx.channels import ChannelLayout, Factor, FreezeReason
from s2h_fx.rules import FUNCTION_RULES, METHOD_RULES, RuleContext

from helpers import count_flops, random_keep, rel_err
from toy_zoo import Blocked, NormGate, SizedHeads, Windows, deblockify, window_reverse_nchw


def check_exact(model: nn.Module, x: torch.Tensor, budget: float = 0.5,
                draws: int = 3) -> s2h_fx.Pruner:
    """At ``budget``: exported == hard, FLOPs within budget; then for random keep-sets:
    exported == hard and exported FLOPs == the pruner's FLOPs model."""
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():
        dense = count_flops(model, (x,))
    pruner = s2h_fx.prune_graph(model, budget, example_inputs=(x,)).eval()
    exported = pruner.export().eval()
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < 1e-5
    assert count_flops(exported, (x,)) <= budget * dense * (1 + 1e-9)
    for seed in range(draws):
        widths, keep = random_keep(pruner, seed)
        pruner.set_widths(widths, keep)
        exported = pruner.export(enforce_budget=False).eval()
        with torch.no_grad():
            assert rel_err(exported(x), pruner(x)) < 1e-5, f"seed {seed}: exported != hard"
        assert pruner.flops() == pytest.approx(count_flops(exported, (x,)), rel=1e-9)
    return pruner


def group_with(pruner: s2h_fx.Pruner, member: str) -> s2h_fx.ChannelGroup:
    return next(g for g in pruner.grouping.groups if member in g.members)


# ---- NesT: the head width computed from the input's channel count ----------------
@pytest.mark.parametrize(("fused", "pos"), [(False, False), (True, False), (True, True)],
                         ids=["matmul", "sdpa", "sdpa-pos-embed"])
def test_head_width_sized_by_input_channels_prunes(fused: bool, pos: bool) -> None:
    """qkv(x).reshape(B, T, N, 3, H, C // H) with C = x.shape[-1]: the embedding's count
    sizes the head width. Both groups used to be frozen ("channel count used as a
    value"), leaving 0.54 of the FLOPs frozen, so budget 0.5 failed. The size is the
    one the reshape leaves free: written as -1, both groups prune. With a position
    embedding, B, T, N depend on its (frozen) ids: they stay as they are."""
    x = torch.randn(2, 4, 5, 12, generator=torch.Generator().manual_seed(0))
    pruner = check_exact(SizedHeads(fused=fused, pos=pos), x)
    assert pruner.grouping.attention == "both"
    embed = group_with(pruner, "embed:out")
    qkv = [g for g in pruner.grouping.groups if "qkv:out" in g.members]
    assert embed.prunable and all(g.prunable for g in qkv), pruner.grouping.table()
    # the 2 heads (2 x 16 channels, kept whole) and one head's width (16, in both)
    assert embed not in qkv and sorted((g.size, g.atom) for g in qkv) == [(16, 1), (32, 16)]
    exported = pruner.eval().export()
    assert exported.get_submodule("qkv").out_features % 6 == 0  # 3 x heads x width


class _OneFree(nn.Module):
    """A reshape that already has its -1: ``C // 2`` (the embedding's count) must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.qkv, self.head = nn.Linear(12, 32), nn.Linear(32, 96), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        B, T, N, C = x.shape
        return self.head(self.qkv(x).reshape(B, T, -1, C // 2).mean((1, 2)))


def test_reshape_with_a_free_size_keeps_its_sizes() -> None:
    """No second -1 can be written: the embedding's count stays a use as a value, and its
    channels stay frozen with that reason (the exact answer here)."""
    x = torch.randn(2, 4, 5, 12)
    gm = s2h_fx.passes.trace_model(_OneFree().eval(), (x,))
    result = s2h_fx.passes.find_channel_groups(gm)
    embed = next(g for g in result.groups if "embed:out" in g.members)
    assert not embed.prunable
    assert any("used as a value" in r for r in embed.frozen), embed.frozen
    reshape = next(n for n in gm.graph.nodes if n.target == "reshape")
    assert -1 in reshape.args and any(getattr(a, "target", None) is operator.floordiv
                                      for a in reshape.args)


class _TwoForeign(nn.Module):
    """A reshape with two sizes read from other channels: no single free size."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 32), nn.Linear(12, 16)
        self.lin, self.head = nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        y = self.lin(a).reshape(x.shape[0], a.shape[-1] // 8, b.shape[-1] // 4)
        return self.head(y.flatten(1) + b)


def test_two_foreign_sizes_stay_frozen() -> None:
    """Two sizes from other channels: -1 cannot stand for both, so the reshape keeps its
    sizes and both channel counts stay frozen as used as values."""
    x = torch.randn(2, 12)
    gm = s2h_fx.passes.trace_model(_TwoForeign().eval(), (x,))
    result = s2h_fx.passes.find_channel_groups(gm)
    for member in ("a:out", "b:out"):
        group = next(g for g in result.groups if member in g.members)
        assert any("used as a value" in r for r in group.frozen), (member, group.frozen)
    reshape = next(n for n in gm.graph.nodes if n.target == "reshape")
    assert -1 not in reshape.args


# ---- NesT / Swin / MaxViT: timm's not-traceable reverse functions -----------------
def test_timm_deblockify_passes_channels_last() -> None:
    """timm's ``deblockify`` stays one call in the graph (timm marks it not traceable).
    It used to be an op without a rule, freezing the embedding (0.52 of NesT's FLOPs
    frozen). It reads C from its input and only moves blocks: channels pass on the last
    axis, the position embedding's block axes are frozen."""
    if deblockify is None:
        pytest.skip("needs timm")
    x = torch.randn(2, 4, 9, 12, generator=torch.Generator().manual_seed(0))
    pruner = check_exact(Blocked(), x)
    embed = group_with(pruner, "embed:out")
    assert embed.prunable, pruner.grouping.table()
    assert "conv:in" in embed.members
    assert not pruner.grouping.unknown_ops
    assert pruner.eval().export().get_submodule("embed").out_features < 32


def _opaque_swap(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2) if int(x.shape[1]) > 0 else x  # fx cannot trace int(Proxy)


torch.fx.wrap("_opaque_swap")


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_opaque_swap(self.a(x).transpose(1, 2)))


def test_rule_registered_by_qualified_name() -> None:
    """A dotted string names a function (never a method): the rule applies to the
    wrapped call without importing it where the rule is written."""
    x = torch.randn(2, 5, 6)
    gm = s2h_fx.passes.trace_model(_Opaque().eval(), (x,))
    before = s2h_fx.passes.find_channel_groups(gm)
    assert not next(g for g in before.groups if "a:out" in g.members).prunable
    name = f"{__name__}._opaque_swap"

    @s2h_fx.register_rule(name)
    def swap(ctx: RuleContext, node: fx.Node) -> ChannelLayout:
        lay = ctx.layout(node.args[0])
        return ChannelLayout(3, tuple(Factor((3 - f.axes[0],), f.ids) for f in lay.factors))

    try:
        assert FUNCTION_RULES[name] is swap and name not in METHOD_RULES
        after = s2h_fx.passes.find_channel_groups(gm)
        assert next(g for g in after.groups if "a:out" in g.members).prunable
    finally:
        del FUNCTION_RULES[name]


def test_timm_window_reverse_nchw_passes_channels_first() -> None:
    """MaxViT's ``window_reverse_nchw`` kept as one call (as timm's tracer keeps it):
    channels pass on axis 1, so conv1's outputs prune with conv2's inputs."""
    if window_reverse_nchw is None:
        pytest.skip("needs timm")
    model = Windows().eval()
    gm = fx.GraphModule(model, fx.Tracer(autowrap_functions=(window_reverse_nchw,)).trace(model))
    assert any(n.target is window_reverse_nchw for n in gm.graph.nodes)
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # 4 windows x 2
    pruner = check_exact(gm, x)
    group = group_with(pruner, "conv1:out")
    assert group.prunable and "conv2:in" in group.members, pruner.grouping.table()
    assert not pruner.grouping.unknown_ops


# ---- CSATv2 / ConvNeXt-V2: GRN's norms and addcmul ---------------------------------
def test_spatial_norm_and_addcmul_keep_channels() -> None:
    """``h.norm(p=2, dim=(2, 3))`` is a reduction over the spatial axes only, and
    ``addcmul(beta, gamma, h * g)`` is element-wise: both used to be ops without a rule,
    freezing conv1's channels; they are per channel, so conv1, gamma and beta prune."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pruner = check_exact(NormGate(), x)
    group = group_with(pruner, "conv1:out")
    assert group.prunable, pruner.grouping.table()
    assert {"gamma[1]", "beta[1]"} <= set(group.members), group.members
    assert not pruner.grouping.unknown_ops


def test_grn_mean_over_channels_prunes_as_a_statistic() -> None:
    """The full GRN divides each channel's norm by the mean of all channels' norms: a
    statistic over the channels, as LayerNorm's. It used to freeze conv1's channels
    (csatv2 could not reach 0.5 of its FLOPs); the pruned network takes the mean over
    the channels it keeps, checked against that mean computed by hand, and exported ==
    hard."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = NormGate(grn=True).eval()
    pruner = check_exact(model, x)
    group = group_with(pruner, "conv1:out")
    assert group.prunable, group.frozen
    widths = {h.index: h.size for h in pruner.grouping.prunable}
    keeps = {h.index: np.arange(h.size) for h in pruner.grouping.prunable}
    keep = np.sort(np.random.default_rng(2).permutation(32)[:16])
    widths[group.index], keeps[group.index] = 16, keep
    pruner.set_widths(widths, keeps)
    exported = pruner.export(enforce_budget=False).eval()
    k = torch.as_tensor(keep)
    with torch.no_grad():
        h = torch.relu(torch.nn.functional.conv2d(x, model.conv1.weight[k], model.conv1.bias[k],
                                                  padding=1))
        g = h.norm(p=2, dim=(2, 3), keepdim=True)
        g = g / (g.mean(dim=1, keepdim=True) + 1e-6)  # over the 16 kept channels
        h = h + torch.addcmul(model.beta[:, k], model.gamma[:, k], h * g)
        ref = model.head(torch.nn.functional.conv2d(h, model.conv2.weight[:, k],
                                                    model.conv2.bias).mean((2, 3)))
        assert rel_err(exported(x), ref) < 1e-5


def test_a_sum_over_channels_is_exact_under_zeroing() -> None:
    """A sum over the channels leaves out the pruned ones exactly as zeroing them does:
    the group prunes and the exported network equals the masked model."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    class SumGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(t))
            return self.b(h * torch.sigmoid(h.sum(1, keepdim=True)))

    pruner = check_exact(SumGate().eval(), x)
    assert group_with(pruner, "a:out").prunable
    for seed in range(3):
        pruner.set_widths(*random_keep(pruner, seed))
        exported = pruner.export(enforce_budget=False).eval()
        with torch.no_grad():
            assert rel_err(exported(x), pruner.eval().masked_forward(x)) < 1e-5


# ---- PoolFormer: GroupNorm with one group --------------------------------------------
class OneGroupNorm(nn.Module):
    """conv -> GroupNorm(1) (statistics over every channel and position) -> conv, once
    as the module and once as timm's GroupNorm1 calls it (F.group_norm)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.norm = nn.GroupNorm(1, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = (torch.nn.functional.group_norm(y, 1, self.norm.weight, self.norm.bias)
             if self.functional else self.norm(y))
        return self.head(torch.relu(self.b(y)))


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_group_norm_with_one_group_prunes_channel_by_channel(functional: bool) -> None:
    """GroupNorm(1, C) kept its C channels as one block (a group is kept or dropped
    whole), so poolformerv2 had nothing to prune. With one group each channel is pruned
    as a LayerNorm's is: the pruned layer is GroupNorm(1, kept) over the kept channels,
    checked against that reference built by hand."""
    torch.manual_seed(0)
    model = OneGroupNorm(functional)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 8)
    pruner = check_exact(model, x)
    g = group_with(pruner, "b:in")
    assert g.prunable and g.size == 16 and g.atom == 1
    keep = np.sort(np.random.default_rng(0).permutation(16)[:8])
    widths = {h.index: h.size for h in pruner.grouping.prunable}
    keeps = {h.index: np.arange(h.size) for h in pruner.grouping.prunable}
    widths[g.index], keeps[g.index] = 8, keep
    pruner.set_widths(widths, keeps)
    exported = pruner.export(enforce_budget=False).eval()
    if not functional:
        assert exported.norm.num_groups == 1 and exported.norm.num_channels == 8
    kept_a = torch.relu(torch.nn.functional.conv2d(
        x, model.a.weight[keep], model.a.bias[keep], padding=1))
    ref = torch.nn.functional.group_norm(kept_a, 1, model.norm.weight[keep], model.norm.bias[keep])
    with torch.no_grad():
        got = exported.norm(kept_a) if not functional else None
        hard = pruner(x)
        assert rel_err(exported(x), hard) < 1e-5
    if got is not None:
        assert rel_err(got, ref) < 1e-5


# ---- NF-RegNet / NF-ResNet / BiT: timm's weight-standardised convolutions ------------
def test_timm_weight_standardised_convs_prune() -> None:
    """timm's StdConv2d / ScaledStdConv2d standardise each output channel's weights
    (F.batch_norm on the weight) before convolving: traced through, the weight is
    computed in the graph and every channel they touch was frozen (nf_regnet_b0: 0.99
    of the FLOPs). As leaves they prune as convolutions, the scaled kind's per-output
    ``gain`` with their outputs; the pruned layer standardises over the inputs it keeps,
    checked against timm's own layer built at the pruned size with the same weights."""
    std_conv = pytest.importorskip("timm.layers.std_conv")
    torch.manual_seed(0)

    class NF(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = std_conv.ScaledStdConv2d(3, 16, 3, padding=1)
            self.b = std_conv.StdConv2d(16, 16, 3, padding=1)
            self.c = std_conv.ScaledStdConv2dSame(16, 16, 3, stride=2)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.a(x))
            y = torch.relu(self.b(y)) + y
            return self.head(torch.relu(self.c(y)))

    model = NF().eval()
    with torch.no_grad():
        model.a.gain.uniform_(0.5, 1.5)
        model.c.gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 9, 9)
    pruner = check_exact(model, x)
    g_in, g_c = group_with(pruner, "c:in"), group_with(pruner, "c:out")
    assert g_in.prunable and g_c.prunable
    widths = {h.index: h.size for h in pruner.grouping.prunable}
    keeps = {h.index: np.arange(h.size) for h in pruner.grouping.prunable}
    rng = np.random.default_rng(1)
    for g in (g_in, g_c):
        widths[g.index], keeps[g.index] = 8, np.sort(rng.permutation(16)[:8])
    pruner.set_widths(widths, keeps)
    exported = pruner.export(enforce_budget=False).eval()
    c = exported.c
    assert type(c) is std_conv.ScaledStdConv2dSame
    assert (c.in_channels, c.out_channels) == (8, 8) and c.gain.shape[0] == 8
    kin, kout = torch.as_tensor(keeps[g_in.index]), torch.as_tensor(keeps[g_c.index])
    ref = std_conv.ScaledStdConv2dSame(8, 8, 3, stride=2).eval()
    with torch.no_grad():
        ref.weight.copy_(model.c.weight[kout][:, kin])
        ref.bias.copy_(model.c.bias[kout])
        ref.gain.copy_(model.c.gain[kout])
        ref.scale = model.c.scale  # the full fan-in's constant, kept
        y = torch.randn(2, 8, 9, 9)
        assert rel_err(c(y), ref(y)) < 1e-5
        assert rel_err(exported(x), pruner(x)) < 1e-5


def test_a_sum_over_two_sets_of_channels_freezes_both() -> None:
    """One mask site per argument: a sum over two factors' axes cannot mask both, so
    both stay frozen (as reductions)."""
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 24, 1)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return (self.a(t).unsqueeze(2) * self.b(t).unsqueeze(1)).sum((1, 2))

    x = torch.randn(2, 3, 4, 4)
    gm = s2h_fx.passes.trace_model(Outer().eval(), (x,))
    result = s2h_fx.passes.find_channel_groups(gm)
    for member in ("a:out", "b:out"):
        group = next(g for g in result.groups if member in g.members)
        assert not group.prunable
        assert any(r.startswith(FreezeReason.CHANNEL_REDUCTION.value) for r in group.frozen)


def test_a_mean_given_axis_reduces_those_axes() -> None:
    """torch's ``axis=`` alias of ``dim``: the spatial mean keeps the channels for the
    linear head (read as a mean over every axis, the head was left uncoupled and the
    export failed)."""
    class AxisMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 32, 3, padding=1), nn.Linear(32, 10)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(t)).mean(axis=(2, 3)))

    pruner = check_exact(AxisMean(), torch.randn(2, 3, 8, 8))
    assert {"conv:out", "fc:in"} <= set(group_with(pruner, "conv:out").members)

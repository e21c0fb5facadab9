"""Regression tests of issue 7, items 2, 6 and 7: channel counts used through
``numel``/``len``/shape arithmetic, masks of a matmul applied once, rule errors that
surface, and three models that used to be frozen whole though they can be pruned.

For every prunable model: for random widths and kept channels, the emitted graph
equals the hard network, equals the masked emulation, and its flop_counter FLOPs
equal ``pruner.flops()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import s2h_fx
from s2h_fx.channels import FreezeReason
from s2h_fx.errors import InvariantError
from s2h_fx.passes import find_channel_groups, trace_model
from s2h_fx.rules.base import FUNCTION_RULES, register_rule

from helpers import count_flops, random_keep, rel_err
from toy_zoo import cbr

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def check_invariants(model: nn.Module, x: torch.Tensor, draws: int = 3) -> s2h_fx.Pruner:
    """emitted == hard (1e-5), emitted == masked (1e-4), FLOPs exact, for random keep-sets."""
    torch.manual_seed(0)
    pruner = s2h_fx.prune_graph(model.eval(), 1.0, example_inputs=(x,))
    pruner.eval()
    for seed in range(draws):
        widths, keep = random_keep(pruner, seed)
        pruner.set_widths(widths, keep)
        emitted = pruner.export().eval()
        with torch.no_grad():
            out = emitted(x)
            assert rel_err(pruner(x), out) < 1e-5, f"seed {seed}: emitted != hard"
            assert rel_err(pruner.masked_forward(x), out) < 1e-4, f"seed {seed}: != masked"
        assert pruner.flops() == pytest.approx(count_flops(emitted, (x,)), rel=1e-9)
    return pruner


def group_of(pruner_or_result, member: str) -> s2h_fx.ChannelGroup:
    groups = getattr(pruner_or_result, "grouping", pruner_or_result).groups
    return next(g for g in groups if member in g.members)


# ---- item 6: a matmul scales each contracted channel by its mask once -------------
class Attention(nn.Module):
    """q = linear(x), k = linear(x), softmax(q @ k^T) @ v, output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 32), nn.Linear(16, 32)
        self.v, self.o = nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.o(attn @ v)


def _per_channel(pruner: s2h_fx.Pruner, slot: tuple[str, int]) -> torch.Tensor:
    g = int(pruner.grouping.group_of_id[pruner.grouping.slots[slot][0]])
    classes = torch.as_tensor(pruner.grouping.class_of_id[pruner.grouping.slots[slot]])
    return pruner.masks()[g].values().detach()[classes]


def test_matmul_masks_each_contracted_channel_once() -> None:
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 5, 16)
    pruner = s2h_fx.prune_graph(model, 1.0, example_inputs=(x,))
    assert group_of(pruner, "q:out") is group_of(pruner, "k:out")  # contracted: one group
    assert group_of(pruner, "v:out").prunable and group_of(pruner, "q:out").prunable
    with torch.no_grad():  # relaxed masks strictly between 0 and 1
        for m in pruner.masks().values():
            m.logits.copy_(torch.randn(m.logits.shape))
    m_qk, m_v = _per_channel(pruner, ("q.weight", 0)), _per_channel(pruner, ("v.weight", 0))
    assert float(m_qk.min()) < 0.5 and float(m_v.min()) < 0.9  # so m * m != m
    # by hand: the mask applied once on the contracted channels and once on v's channels
    with torch.no_grad():
        q, k, v = model.q(x) * m_qk, model.k(x), model.v(x) * m_v
        expected = model.o(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)
        got = pruner.soft_forward(x)
    assert rel_err(got, expected) < 1e-6
    sites = [n for n in pruner.graph_module.graph.nodes if n.op == "call_module"
             and str(n.target).startswith("s2h_mask")]
    assert len(sites) == 2  # q before q @ k^T, and attn @ v before the projection


def test_attention_invariants() -> None:
    check_invariants(Attention(), torch.randn(2, 5, 16))


# ---- item 2: channel counts through numel(), len() and size tuples -------------------
fx.wrap("len")  # as a user would, to trace len() of a tensor


class Probe(nn.Module):
    """stem (16 channels, the group under test) -> op -> 1x1 conv head."""

    def __init__(self, op, cin: int = 16) -> None:
        super().__init__()
        self.stem, self.op, self.head = cbr(3, 16), op, nn.Conv2d(cin, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(self.stem(x)))


SCALED_BY_COUNT = {
    # the case: the scale changes when channels are removed, so the pruned
    # network would compute another function than the masked one
    "numel": lambda h: h * (1000 / h.numel()),
    "nelement": lambda h: h / h.nelement() ** 0.5,
    "len": lambda h: h / len(h[0]),  # h[0] is C x H x W: its length is the channel count
    "size tuple": lambda h: h * h.shape[1:][0],
}


@pytest.mark.parametrize("name", list(SCALED_BY_COUNT))
def test_channel_count_used_as_a_scale_freezes(name: str) -> None:
    result = find_channel_groups(trace_model(Probe(SCALED_BY_COUNT[name]), (X,)))
    group = group_of(result, "stem.0:out")
    assert not group.prunable
    assert any(FreezeReason.SIZE_AS_VALUE.value in why for why in group.frozen), group.frozen


class FlattenByNumel(nn.Module):
    """numel() and a size tuple used as the size of the same channels: the graph adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 16), cbr(3, 24)
        self.fc = nn.Linear(16 * 4, 5)
        self.c = nn.Conv1d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.a(x), 2)
        flat = h.view(h.shape[0], h.numel() // h.shape[0])  # N x (C * 4)
        g = self.b(x)
        seq = g.reshape(g.shape[:2] + (-1,))  # N x C x (H * W)
        return self.fc(flat) + self.c(seq).mean(2)


def test_channel_count_used_as_its_own_size_adapts() -> None:
    pruner = check_invariants(FlattenByNumel(), X)
    assert group_of(pruner, "a.0:out").prunable and group_of(pruner, "b.0:out").prunable


# ---- item 7: rule errors surface; slices bounded by another tensor's size -----------
def _buggy(x: torch.Tensor) -> torch.Tensor:
    return x * 2


fx.wrap("_buggy")


class UsesBuggy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_buggy(self.a(x)))


def test_a_rule_that_raises_is_an_error_naming_node_rule_and_line() -> None:
    @register_rule(_buggy)
    def buggy_rule(ctx, node):
        return {}["missing"]  # a bug in the rule

    try:
        with pytest.raises(InvariantError) as info:
            find_channel_groups(trace_model(UsesBuggy(), (X,)))
    finally:
        FUNCTION_RULES.pop(_buggy)
    msg = str(info.value)
    assert "buggy_rule" in msg and "_buggy" in msg  # the rule and the node
    assert "KeyError" in msg and "test_grouping_fixes.py" in msg  # the cause and the user line
    assert "return self.b(_buggy(self.a(x)))" in msg


class SliceBySize(nn.Module):
    """y = cat(a, b); y[:, : a.shape[1]] takes a's channels back."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 16), cbr(3, 24)
        self.c, self.d, self.e = cbr(16, 8), cbr(40, 8), cbr(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        y = torch.cat([a, self.b(x)], 1)
        # a spatial bound from a size stays a graph value; channel bounds become constants
        return self.c(y[:, : a.shape[1]]) + self.e(y[:, a.shape[1] :]) + self.d(y)[:, :, : x.shape[2]]


def test_slice_bounded_by_another_tensors_size_is_prunable() -> None:
    pruner = check_invariants(SliceBySize(), X)
    # the two producers keep their own groups; the head reaches the output
    assert group_of(pruner, "a.0:out").prunable and group_of(pruner, "b.0:out").prunable
    assert group_of(pruner, "a.0:out") is not group_of(pruner, "b.0:out")


# ---- item 7c: a producer that covers part of a linked group -------------------------
class ConvOfCatPlusCat(nn.Module):
    """conv(cat(a, b)) + cat(a, b), then a split on the cat boundary (the issue's case).

    The conv's output is added to the cat, so its channels 0-15 are a's and 16-31 are
    b's; the split uses a's and b's channels apart. Two groups, a's and b's, each
    with the conv's matching output channels; nothing is frozen but the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.a, self.b, self.c = cbr(16, 16), cbr(16, 16), cbr(32, 32)
        self.d, self.e = cbr(16, 8), cbr(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([self.a(x), self.b(x)], 1)
        p, q = torch.split(self.c(y) + y, [16, 16], 1)
        return self.d(p) + self.e(q)


def test_conv_of_cat_plus_cat_split_on_the_boundary_is_prunable() -> None:
    pruner = check_invariants(ConvOfCatPlusCat(), X)
    ga, gb = group_of(pruner, "a.0:out"), group_of(pruner, "b.0:out")
    assert ga is not gb and ga.prunable and gb.prunable and ga.size == gb.size == 16
    assert "c.0:out" in ga.members and "c.0:out" in gb.members  # the conv feeds both
    assert group_of(pruner, "stem.0:out").prunable
    assert [g.members for g in pruner.grouping.frozen] == [("d.0:out", "d.1", "e.0:out", "e.1")]


class SliceOfOneProducer(nn.Module):
    """h[:, :16] of a 32-channel conv: the two halves are pruned apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = cbr(3, 32), cbr(16, 8), cbr(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.a(h[:, :16]) + self.b(h)


def test_slice_inside_a_producer_splits_it_into_two_groups() -> None:
    pruner = check_invariants(SliceOfOneProducer(), X)
    halves = [g for g in pruner.grouping.prunable if "stem.0:out" in g.members]
    assert sorted(g.size for g in halves) == [16, 16]


# ---- item 7b: a channel shuffle between grouped convs in a residual block ----------
class ShuffleBlock(nn.Module):
    """x + g2(shuffle(g1(x))), g1 and g2 grouped (4 groups of 16), as in ShuffleNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 64)
        self.g1, self.g2 = cbr(64, 64, groups=4), cbr(64, 64, groups=4)
        self.head = nn.Conv2d(64, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.g1(x)
        n, c, hh, ww = h.shape
        h = h.view(n, 4, c // 4, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        return self.head(x + self.g2(h))


def test_shuffle_between_grouped_convs_prunes_inside_every_conv_group() -> None:
    """Pruning whole conv groups cannot work here (the shuffle sends every conv group's
    channels to every group of g2), so each conv group keeps the same channels:
    channel i of every group of 16 is one class. The stream x (g1's input, g2's
    output) has 16 classes of 4 channels. g1's output: 16 classes, but after the
    shuffle g2's input group j holds classes 4j..4j+3, and tying g2's groups makes
    class i the same as class i mod 4: 4 classes of 16 channels."""
    torch.manual_seed(0)
    model = ShuffleBlock().eval()
    pruner = s2h_fx.prune_graph(model, 1.0, example_inputs=(X,), divisor=2)
    stream, inner = group_of(pruner, "g2.0:out"), group_of(pruner, "g1.0:out")
    assert (stream.size, inner.size) == (16, 4) and stream.prunable and inner.prunable
    assert "stem.0:out" in stream.members and "g2.0:in" in inner.members
    pruner.eval()
    rng = torch.Generator().manual_seed(1)
    for w_stream, w_inner in [(8, 2), (14, 4), (16, 2), (2, 2)]:
        keep = {g.index: torch.randperm(g.size, generator=rng)[:w].sort().values.numpy()
                for g, w in ((stream, w_stream), (inner, w_inner))}
        pruner.set_widths({stream.index: w_stream, inner.index: w_inner}, keep)
        emitted = pruner.export().eval()
        with torch.no_grad():
            out = emitted(X)
            assert rel_err(pruner(X), out) < 1e-5
            assert rel_err(pruner.masked_forward(X), out) < 1e-4
        assert pruner.flops() == pytest.approx(count_flops(emitted, (X,)), rel=1e-9)
        g1, g2 = emitted.get_submodule("g1.0"), emitted.get_submodule("g2.0")
        assert g1.groups == g2.groups == 4  # the same number of channels in every group
        assert (g1.in_channels, g1.out_channels) == (4 * w_stream, 16 * w_inner)
        assert (g2.in_channels, g2.out_channels) == (16 * w_inner, 4 * w_stream)


def test_grouped_conv_with_whole_groups_keeps_pruning_whole_groups() -> None:
    """Without a shuffle, whole conv groups are pruned (atoms of 16), as before."""
    model = nn.Sequential(cbr(3, 64), cbr(64, 64, groups=4), nn.Conv2d(64, 4, 1))
    result = find_channel_groups(trace_model(model, (X,)))
    group = group_of(result, "1.0:out")
    assert group.prunable and (group.size, group.atom) == (64, 16)


def test_a_model_without_channels_has_no_groups() -> None:
    result = find_channel_groups(trace_model(nn.ReLU(), (torch.randn(2, 3),)))
    assert result.groups == () and result.unknown_ops == ()


class ViewByLen(nn.Module):
    """len(h[0]) (the channel count) used as the size of the same channels: adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc = cbr(3, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.fc(h.reshape(h.shape[0], len(h[0]), -1).mean(-1))


def test_len_as_the_size_of_the_same_channels_adapts() -> None:
    result = find_channel_groups(trace_model(ViewByLen(), (X,)))
    assert group_of(result, "stem.0:out").prunable  # len has a rule: not an unknown op
    pruner = check_invariants(ViewByLen(), X)
    assert group_of(pruner, "stem.0:out").prunable


def test_components_numbered_by_smallest_member() -> None:
    """Classes come from the coupled pairs alone (no per-id loop): 3-0, 1-2 and 2-3
    make 0..3 one class, 6-5 another, 4 and 7 are alone; numbering follows each
    component's smallest id (not the order the pairs came in)."""
    from s2h_fx.passes.find_channel_groups import _components

    pairs = [(np.array([6, 3]), np.array([5, 0])), (np.array([1, 2]), np.array([2, 3]))]
    assert _components(8, pairs).tolist() == [0, 0, 0, 0, 1, 2, 2, 3]
    assert _components(3, []).tolist() == [0, 1, 2]


class _SlicedGate(nn.Module):
    """FocalNet's modulation: one channel of a gate conv's output, sliced to size 1,
    multiplies every channel of another tensor (a broadcast, not a coupling)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gate = nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gate(x)
        return self.out(torch.relu(self.a(x)) * gates[:, 3:4])


def test_sliced_channel_broadcast_over_channels_is_not_a_coupling() -> None:
    """16 channels times one sliced gate channel: the rule used to try to couple 16
    ids with 1 (an InvariantError); the 16 stay prunable, the gate channel is kept."""
    torch.manual_seed(0)
    model, x = _SlicedGate().eval(), torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(model, 0.6, example_inputs=(x,))
    members = {m for g in pruner.grouping.prunable for m in g.members}
    assert "a:out" in members and "gate:out" not in members
    pruned = pruner.eval().export()
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < 1e-5
    assert pruned.get_submodule("a").out_channels < 16

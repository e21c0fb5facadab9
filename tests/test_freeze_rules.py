"""Each rule that freezes a group, on a model that triggers it: the group is frozen
and the reason says why. Plus strict mode and a user-registered rule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import s2h_fx
from s2h_fx.channels import FreezeReason
from s2h_fx.passes import find_channel_groups, trace_model
from s2h_fx.rules import RuleContext, register_rule
from s2h_fx.rules.elementwise import pointwise

from helpers import rel_err
from toy_zoo import cbr


class Probe(nn.Module):
    """stem (the group under test) -> op -> conv -> head."""

    def __init__(self, op, cin: int = 16, cout: int = 16) -> None:
        super().__init__()
        self.stem, self.op = cbr(3, cout), op
        self.body = cbr(cin, 16)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.op(self.stem(x), x)))


def _stem_group(op, cin: int = 16, cout: int = 16) -> s2h_fx.ChannelGroup:
    model = Probe(op, cin, cout)
    result = find_channel_groups(trace_model(model, (torch.randn(2, 3, 8, 8),)))
    return next(g for g in result.groups if "stem.0:out" in g.members)


CASES = {
    FreezeReason.UNTRACKED_OPERAND: (lambda h, x: h + x.mean(1, keepdim=True).expand_as(h) * 0
                                     + torch.ones_like(h), 16, 16),
    # a maximum over the channels: zeroing a channel is not removing it, nor a statistic
    FreezeReason.CHANNEL_REDUCTION: (lambda h, x: h * h.amax(1, keepdim=True), 16, 16),
    FreezeReason.CHANNEL_INDEXING: (lambda h, x: h[:, ::2], 8, 16),
    # a slice through a block that GroupNorm keeps whole (channels 0-7): the slice's width
    # would depend on which blocks are kept, not on the group's width
    FreezeReason.PARTIAL_USE: (lambda h, x: torch.cat([F.group_norm(h, 2), h[:, :4]], 1), 20, 16),
    FreezeReason.IRREGULAR_LAYOUT: (lambda h, x: F.pad(h, (0, 0, 0, 0, 1, 1)), 18, 16),
    FreezeReason.TOO_SMALL: (lambda h, x: h, 6, 6),
    # the channel count as a scale (it would change with the width)
    FreezeReason.SIZE_AS_VALUE: (lambda h, x: h * h.size(1) ** -0.5, 16, 16),
}
# reasons tested elsewhere in this file or in the golden tables
ELSEWHERE = {FreezeReason.UNKNOWN_OP, FreezeReason.MODEL_OUTPUT, FreezeReason.GROUPED_CONV,
             FreezeReason.NON_UNIFORM,
             # a learned RoPE table inside whole heads: tests/test_rope_heads.py
             FreezeReason.WITHIN_BLOCK}


def test_every_reason_has_a_negative_test() -> None:
    assert set(CASES) | ELSEWHERE == set(FreezeReason)


class SizeAsSize(nn.Module):
    """c = x.size(1) reused as the size of the same channels: the reshape adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 16), nn.Conv1d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        n, c, _, _ = h.shape
        return self.b(h.reshape(n, c, -1))


def test_channel_count_used_as_its_own_size_stays_prunable() -> None:
    x = torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(SizeAsSize().eval(), 0.7, example_inputs=(x,))
    assert pruner.grouping.prunable and pruner.widths[0] < 16
    pruner.eval()
    assert rel_err(pruner(x), pruner.export()(x)) < 1e-5


@pytest.mark.parametrize("reason", list(CASES), ids=lambda r: r.name)
def test_freeze_reason(reason: FreezeReason) -> None:
    op, cin, cout = CASES[reason]
    group = _stem_group(op, cin, cout)
    assert not group.prunable
    assert any(reason.value in why for why in group.frozen), group.frozen


def test_softmax_over_channels_is_a_reduction() -> None:
    group = _stem_group(lambda h, x: h.softmax(dim=1))
    assert any(FreezeReason.CHANNEL_REDUCTION.value in w for w in group.frozen)


def test_normalize_over_channels_prunes_exactly() -> None:
    """F.normalize over the channels (p > 0): a zeroed channel adds nothing to the norm,
    so the exported network equals the model with the dropped channels zeroed at the
    stem. p < 0 (a zero would dominate the norm) and ``out=`` freeze."""
    group = _stem_group(lambda h, x: F.normalize(h, p=-1.0, dim=1))
    assert any(FreezeReason.CHANNEL_REDUCTION.value in w for w in group.frozen)
    group = _stem_group(lambda h, x: F.normalize(h, dim=1, out=torch.empty_like(h)))
    assert any(FreezeReason.CHANNEL_REDUCTION.value in w for w in group.frozen)
    for p in (2.0, 1.0, float("inf")):
        torch.manual_seed(0)
        model = Probe(lambda h, x, p=p: F.normalize(h, p=p, dim=1)).eval()
        x = torch.randn(2, 3, 8, 8)
        pruner = s2h_fx.prune_graph(model, 0.5, (x,))
        stem = next(g for g in pruner.grouping.groups if "stem.0:out" in g.members)
        assert stem.prunable
        keep = torch.arange(0, 16, 2)  # the even channels of the stem
        widths = {g.index: g.size for g in pruner.grouping.prunable}
        keeps = {g.index: torch.arange(g.size).numpy() for g in pruner.grouping.prunable}
        widths[stem.index], keeps[stem.index] = 8, keep.numpy()
        pruner.set_widths(widths, keeps)
        exported = pruner.export(enforce_budget=False)
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            drop = torch.ones(16, dtype=torch.bool)
            drop[keep] = False
            zeroed.stem[1].weight[drop] = 0  # the stem's BatchNorm: its output channel is 0
            zeroed.stem[1].bias[drop] = 0
            assert rel_err(exported(x), zeroed(x)) < 1e-5
            assert rel_err(pruner.masked_forward(x), exported(x)) < 1e-5  # the masked model too


def test_spatial_ops_do_not_freeze() -> None:
    group = _stem_group(lambda h, x: F.max_pool2d(h, 2) * h.mean((2, 3), keepdim=True))
    assert group.prunable


def test_grouped_conv_with_multiplier_is_frozen() -> None:
    model = nn.Sequential(cbr(3, 16), nn.Conv2d(16, 32, 3, groups=16), nn.ReLU(),
                          nn.Conv2d(32, 2, 1))
    result = find_channel_groups(trace_model(model, (torch.randn(2, 3, 8, 8),)))
    group = next(g for g in result.groups if "0.0:out" in g.members)
    assert any(FreezeReason.GROUPED_CONV.value in w for w in group.frozen)


def _opaque_a(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * 2


def _opaque_b(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1)


fx.wrap("_opaque_a")
fx.wrap("_opaque_b")


class TwoUnknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = cbr(3, 16), cbr(16, 16), nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(_opaque_b(self.b(_opaque_a(self.a(x)))))


def test_unknown_ops_reported_together_and_strict_raises(caplog) -> None:
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING"):
        result = find_channel_groups(trace_model(TwoUnknown(), (x,)))
    assert len(result.unknown_ops) == 2
    warnings = [r for r in caplog.records if "without a coupling rule" in r.getMessage()]
    assert len(warnings) == 1
    assert "_opaque_a" in warnings[0].getMessage() and "_opaque_b" in warnings[0].getMessage()
    with pytest.raises(s2h_fx.UnsupportedOpError, match="_opaque_a.*_opaque_b"):
        s2h_fx.prune_graph(TwoUnknown(), 0.9, example_inputs=(x,), strict=True)


def test_user_rule_makes_an_op_prunable() -> None:
    """A flip over channels reverses ids (and commutes with pruning): a user rule says so."""
    x = torch.randn(2, 3, 8, 8)
    before = find_channel_groups(trace_model(TwoUnknown(), (x,)))
    assert sum(g.prunable for g in before.groups) == 0

    from s2h_fx.channels import ChannelLayout, Factor
    from s2h_fx.rules.base import FUNCTION_RULES

    @register_rule(_opaque_b, _opaque_a)
    def flip_or_roll(ctx: RuleContext, node: fx.Node) -> ChannelLayout:
        lay = ctx.layout(node.args[0])
        f = lay.factor_at(1)
        ids = f.ids[::-1] if node.target is _opaque_b else f.ids
        return ChannelLayout(lay.ndim, (Factor((1,), ids.copy()),))

    try:
        model = TwoUnknown().eval()
        pruner = s2h_fx.prune_graph(model, 0.6, example_inputs=(x,))
        assert len(pruner.grouping.prunable) == 2
        pruner.eval()
        pruned = pruner.export()
        assert rel_err(pruner(x), pruned(x)) < 1e-5
        assert rel_err(pruner.masked_forward(x), pruned(x)) < 1e-5  # masked emulation agrees
    finally:
        FUNCTION_RULES.pop(_opaque_a), FUNCTION_RULES.pop(_opaque_b)


class Blocky(nn.Module):
    """A user layer kept whole (a leaf) whose rule declares blocks of unequal size."""

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return h * 2


def test_blocks_of_unequal_size_freeze() -> None:
    @register_rule(Blocky)
    def blocky(ctx: RuleContext, node: fx.Node):
        lay = ctx.layout(node.args[0])
        ids = lay.factor_at(1).ids
        ctx.block(ids[:8])  # one block of 8 ...
        ctx.block(ids[12:16])  # ... and one of 4: atoms of unequal size
        return pointwise(ctx, node)

    from s2h_fx.passes.trace_model import LEAF_MODULES
    from s2h_fx.rules.base import MODULE_RULES

    LEAF_MODULES.append(Blocky)
    try:
        group = _stem_group(Blocky())
        reason = " ".join(group.frozen)
        assert FreezeReason.NON_UNIFORM.value in reason
    finally:
        MODULE_RULES.pop(Blocky)
        LEAF_MODULES.remove(Blocky)

"""An op of the user's taught in one place: its rule, its module surgery and its
argument rewrite (s2h_fx.register_op)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import s2h_fx
from s2h_fx.channels import ChannelLayout, Factor
from s2h_fx.passes.plan_surgery import FUNCTION_REWRITES, METHOD_REWRITES, RewriteContext
from s2h_fx.rules import base as rules_base
from s2h_fx.rules.base import RuleContext

from helpers import rel_err


@torch.fx.wrap
def pool_to(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A user's op with a channel count among its arguments: (B, C, H, W) -> (B, C)."""
    return F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], channels)


class PoolHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(pool_to(torch.relu(self.bn(self.conv(x))), 16))


def pool_to_rule(ctx: RuleContext, node: fx.Node) -> ChannelLayout:
    """Channel ids leave axis 1 of the input for axis 1 of the (B, C) output."""
    lay = ctx.layout(node.args[0])
    f = lay.factor_at(1) if lay is not None else None
    return ChannelLayout(2, (Factor((1,), f.ids),) if f is not None else ())


def pool_to_rewrite(node: fx.Node, ctx: RewriteContext):
    return (node.args[0], ctx.shape(node)[1]), dict(node.kwargs)


@pytest.fixture
def forget_pool_to():
    yield
    rules_base.FUNCTION_RULES.pop(pool_to, None)
    FUNCTION_REWRITES.pop(pool_to, None)


def _pruner() -> tuple[s2h_fx.Pruner, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    return s2h_fx.prune_graph(PoolHead().eval(), 0.5, (x,)).eval(), x


def test_rule_and_rewrite_together_prune_the_op_exactly(forget_pool_to) -> None:
    s2h_fx.register_op(pool_to, rule=pool_to_rule, rewrite=pool_to_rewrite)
    pruner, x = _pruner()
    (group,) = pruner.grouping.prunable  # conv, bn and fc's input: one group through pool_to
    assert group.size == 16
    pruned = pruner.export()
    (call,) = [n for n in pruned.graph.nodes if n.target is pool_to]
    width = pruner.widths[group.index]
    assert width < 16 and call.args[1] == width  # the count argument was rewritten
    assert rel_err(pruner(x), pruned(x)) < 1e-5


def test_without_the_rewrite_the_count_goes_stale(forget_pool_to) -> None:
    """The rule alone prunes through the op but leaves its argument at 16: the emitted
    graph cannot reshape fewer channels to 16 (what the rewrite is for)."""
    s2h_fx.register_op(pool_to, rule=pool_to_rule)
    pruner, x = _pruner()
    assert len(pruner.grouping.prunable) == 1
    with pytest.raises(Exception, match="shape|size"):
        pruner.export()(x)


def test_unknown_op_stays_frozen_without_a_rule() -> None:
    pruner_error = None
    try:
        _pruner()
    except s2h_fx.NoPrunableChannelsError as exc:
        pruner_error = exc
    assert pruner_error is not None and "pool_to" in str(pruner_error)


def test_register_op_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="target"):
        s2h_fx.register_op(rule=pool_to_rule)
    with pytest.raises(TypeError, match="rule, a surgery or a rewrite"):
        s2h_fx.register_op(pool_to)
    with pytest.raises(TypeError, match="not module types"):
        s2h_fx.register_op(pool_to, surgery=lambda m, shape: None)
    assert pool_to not in rules_base.FUNCTION_RULES  # nothing half-registered


def test_builtin_rewrites_are_registry_entries() -> None:
    """view/reshape, split/chunk, slicing, layer_norm and group_norm are entries a user
    can look up or replace, not a fixed chain."""
    assert {"view", "reshape", "split", "chunk"} <= set(METHOD_REWRITES)
    for fn in (torch.reshape, torch.split, torch.chunk, F.layer_norm, F.group_norm):
        assert fn in FUNCTION_REWRITES

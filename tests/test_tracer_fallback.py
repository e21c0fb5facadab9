"""The tracer gets through submodules torch.fx cannot trace: each becomes a call_module
leaf, its boundary channels are frozen (an op without a rule), the rest still prunes,
and how it was traced is recorded on the graph module. A failure in the model's own
forward still raises TraceError."""

from __future__ import annotations

import copy
import io
import logging
import operator
import sys

import pytest
import torch
from torch import fx, nn

import s2h_fx
from s2h_fx.errors import TraceError
from s2h_fx.passes import trace_model
from s2h_fx.passes.trace_model import S2H_TRACE, S2H_TRACE_LEAF

from helpers import rel_err

X = torch.randn(2, 3, 12, 12)
CONTROL_FLOW = "symbolically traced variables cannot be used as inputs to control flow"


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * self.scale.view(1, -1, 1, 1)
        return -x


class Net(nn.Module):
    """conv(3->16) relu conv(16->32) relu Gate(32) conv(32->24) relu | head conv(24->5)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(), Gate(32), nn.Conv2d(32, 24, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).mean((2, 3))


def _leaf_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}


def test_failing_submodule_becomes_a_frozen_leaf_and_the_rest_prunes(caplog) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.INFO, logger="s2h_fx.passes.trace_model"):
        pruner = s2h_fx.prune_graph(model, budget=0.5, example_inputs=(X,))
    gm = pruner.graph_module
    assert "body.4" in _leaf_nodes(gm)  # Gate is one call_module node
    assert "body.4" in caplog.text and CONTROL_FLOW in caplog.text  # logged, with why
    trace = gm.meta[S2H_TRACE]
    assert trace["method"] == "leaf fallback"
    assert set(trace["leaves"]) == {"body.4"}
    assert trace["leaves"]["body.4"].startswith("traced as a leaf: TraceError")
    # Gate's boundary: conv 16->32's outputs are frozen, the reason names the leaf
    by_member = {m: g for g in pruner.grouping.groups for m in g.members}
    gate_group = by_member["body.2:out"]
    assert not gate_group.prunable
    assert any("body.4" in r and "traced as a leaf: TraceError" in r for r in gate_group.frozen), (
        gate_group.frozen)
    # the groups away from the leaf prune: conv 3->16's outputs, conv 32->24's outputs
    assert by_member["body.0:out"].prunable and by_member["body.5:out"].prunable
    exported = pruner.export()
    pruner.eval()
    assert rel_err(exported(X), pruner(X)) < 1e-5
    assert exported.get_submodule("body.0").out_channels < 16
    assert exported.get_submodule("body.2").out_channels == 32  # frozen: kept whole
    # the user's model is unchanged, and still not traceable by plain fx
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.body[0].out_channels == 16 and isinstance(model.body[4], Gate)
    with pytest.raises(Exception, match="control flow"):
        fx.symbolic_trace(model)


def test_traced_with_a_leaf_saves_loads_and_deep_copies() -> None:
    """The record in gm.meta must not stop torch.save (torch.fx's pickling itself
    drops gm.meta; deepcopy keeps it), nor the leaf stop the loaded model running."""
    pruner = s2h_fx.prune_graph(Net().eval(), budget=0.5, example_inputs=(X,))
    exported = pruner.export()
    assert exported.meta[S2H_TRACE]["leaves"].keys() == {"body.4"}
    buf = io.BytesIO()
    torch.save(exported, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(X), exported(X))
    assert copy.deepcopy(exported).meta[S2H_TRACE] == exported.meta[S2H_TRACE]


def test_leaf_node_carries_its_reason() -> None:
    gm = trace_model(Net().eval(), (X,))
    leaf = _leaf_nodes(gm)["body.4"]
    assert CONTROL_FLOW in leaf.meta[S2H_TRACE_LEAF]
    assert S2H_TRACE_LEAF not in _leaf_nodes(gm)["body.2"].meta  # a plain conv


def test_plain_model_is_traced_by_plain_fx() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    gm = trace_model(model, (X,))
    assert gm.meta[S2H_TRACE] == {"method": "fx", "leaves": {}, "autowrap": {}, "guards": []}


class TopLevelBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.mean() > 0 else -y


def test_control_flow_in_the_models_own_forward_still_raises() -> None:
    with pytest.raises(TraceError) as info:
        s2h_fx.prune_graph(TopLevelBranch(), budget=0.5, example_inputs=(X,))
    msg = str(info.value)
    assert "could not trace TopLevelBranch" in msg and "control flow" in msg
    assert "y if y.mean() > 0" in msg  # the user's line


class Outer(nn.Module):
    """Its own forward branches on data too: making Gate a leaf is not enough."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(x)
        return y if y.amax() > -1e9 else y + 1


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.outer = Outer()
        self.tail = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.tail(self.outer(self.stem(x)))))


def test_leaf_moves_up_to_the_parent_that_still_fails() -> None:
    gm = trace_model(Nested().eval(), (X,))
    leaves = gm.meta[S2H_TRACE]["leaves"]
    assert set(leaves) == {"outer"}  # outer.gate was tried first, then outer itself
    assert "outer" in _leaf_nodes(gm) and "outer.gate" not in _leaf_nodes(gm)
    model = Nested().eval()
    assert torch.equal(trace_model(model, (X,))(X), model(X))


class TwoGates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.g1 = nn.Conv2d(3, 8, 3, padding=1), Gate(8)
        self.b, self.g2 = nn.Conv2d(8, 8, 3, padding=1), Gate(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.g2(self.b(self.g1(self.a(x)))))


def test_second_failing_instance_makes_its_whole_type_a_leaf() -> None:
    model = TwoGates().eval()
    gm = trace_model(model, (X,))
    leaves = gm.meta[S2H_TRACE]["leaves"]
    assert set(leaves) == {"g1", "g2"}
    assert "every Gate" in leaves["g2"]
    assert torch.equal(gm(X), model(X))


def test_gives_up_after_the_retrace_limit(monkeypatch) -> None:
    monkeypatch.setattr(sys.modules["s2h_fx.passes.trace_model"], "MAX_FALLBACK_LEAVES", 1)
    with pytest.raises(TraceError, match=r"Already traced as leaves: g1 \(gave up after 1"):
        trace_model(TwoGates().eval(), (X,))


class OptionalMask(nn.Module):
    """forward(x, mask=None): traced as a proxy, mask would take the masked branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                flip: bool = False) -> torch.Tensor:
        y = torch.relu(self.a(x))
        if mask is not None:
            y = y * mask
        if flip:
            y = -y
        return self.b(y)


def test_defaulted_arguments_the_inputs_do_not_reach_are_traced_at_their_default() -> None:
    model = OptionalMask().eval()
    pruner = s2h_fx.prune_graph(model, budget=0.5, example_inputs=(X,))
    gm = pruner.graph_module
    assert gm.meta[S2H_TRACE]["method"] == "fx"
    assert not any(n.op == "call_function" and n.target is operator.mul for n in gm.graph.nodes)
    exported = pruner.export()
    pruner.eval()
    assert rel_err(exported(X), pruner(X)) < 1e-5
    assert exported.get_submodule("a").out_channels < 16
    full = trace_model(model, (X,))
    assert torch.equal(full(X), model(X))

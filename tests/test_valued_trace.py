"""Control flow on sizes: traced with the example's values, decided as on the example
inputs and guarded in the graph (s2h_fx.valued). Control flow on data still stops the
trace (its submodule becomes a leaf)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx
from s2h_fx.channels import FreezeReason
from s2h_fx.errors import TraceError
from s2h_fx.passes import find_channel_groups, trace_model
from s2h_fx.passes.trace_model import S2H_TRACE

from helpers import count_flops, rel_err


class PadToWindow(nn.Module):
    """Pads the feature map to a multiple of the window only where it is not one."""

    def __init__(self, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        _, _, height, width = h.shape
        if height % self.window or width % self.window:
            h = F.pad(h, (0, -width % self.window, 0, -height % self.window))
        return self.b(h).mean((2, 3))


def test_branch_on_a_size_is_taken_as_on_the_example_and_guarded() -> None:
    model, x = PadToWindow().eval(), torch.randn(2, 3, 10, 10)
    pruner = s2h_fx.prune_graph(model, 0.5, (x,))
    trace = pruner.graph_module.meta[S2H_TRACE]
    assert trace["method"] == "fx, sizes of the example" and not trace["leaves"]
    assert len(trace["guards"]) == 1 and "height % self.window" in trace["guards"][0]
    assert pruner.grouping.prunable  # nothing was kept whole
    exported = pruner.eval().export()
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < 1e-5
        assert exported(torch.randn(5, 3, 10, 10)).shape == (5, 8)  # the batch is free
        assert exported(torch.randn(1, 3, 6, 6)).shape == (1, 8)  # pads too: same branch
        with pytest.raises(AssertionError, match="another branch at .*height % self.window"):
            exported(torch.randn(1, 3, 8, 8))  # would not pad: not the traced branch
    assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


class Rows(nn.Module):
    """Iterates over the rows of a feature map (a Python loop over a size)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        rows = [h[:, :, i].mean(-1) for i in range(h.shape[2])]
        return self.b(sum(rows) / len(rows))


def test_a_size_used_as_a_python_int_is_guarded_to_its_value() -> None:
    model, x = Rows().eval(), torch.randn(2, 3, 5, 7)
    pruner = s2h_fx.prune_graph(model, 0.5, (x,))
    assert pruner.graph_module.meta[S2H_TRACE]["guards"]
    exported = pruner.eval().export()
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < 1e-5
        wider = torch.randn(3, 3, 5, 9)  # the loop is over the rows: the width is free
        assert rel_err(exported(wider), pruner(wider)) < 1e-5
        with pytest.raises(AssertionError, match="another branch"):
            exported(torch.randn(2, 3, 6, 7))  # 6 rows: the loop ran 5 times


class ChannelBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.shape[1] > 8:  # a branch on the channel count: pruning could change it
            h = h * 2
        return self.b(h).mean((2, 3))


def test_a_branch_on_a_channel_count_freezes_those_channels() -> None:
    gm = trace_model(ChannelBranch().eval(), (torch.randn(2, 3, 8, 8),))
    result = find_channel_groups(gm)
    group = next(g for g in result.groups if "a:out" in g.members)
    assert not group.prunable
    assert any(FreezeReason.SIZE_AS_VALUE.value in why for why in group.frozen)


class DataBranch(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * 2 if h.sum() > 0 else h


class Outer(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.a, self.inner, self.b = nn.Conv2d(3, 16, 3, padding=1), inner, nn.Conv2d(16, 16, 3)
        self.c = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.inner(self.a(x)))).mean((2, 3))


def test_a_branch_on_data_is_not_decided() -> None:
    """In the model's own forward: a TraceError naming the line; in a submodule: that
    submodule becomes a leaf and the rest prunes."""
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError, match="computed from a tensor's data"):
        trace_model(DataBranchModel().eval(), (x,))
    pruner = s2h_fx.prune_graph(Outer(DataBranch()).eval(), 0.7, (x,))
    trace = pruner.graph_module.meta[S2H_TRACE]
    assert list(trace["leaves"]) == ["inner"]
    assert trace["method"] == "leaf fallback"  # no decision was taken on a size
    assert any("b:out" in g.members for g in pruner.grouping.prunable)


class DataSized(nn.Module):
    """Python values from data, in the forms the tracer must not take for sizes."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form, self.a = form, nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        _ = h.shape[-1] % 2 == 1 and h  # a branch on a size first: the valued trace runs
        m = h.mean((2, 3))
        if self.form == "tolist":
            n = len((m[:, 0] > 0).nonzero().flatten().tolist())
        elif self.form == "nonzero":
            n = (m > 0).nonzero().shape[0]
        elif self.form == "mask":
            n = m[m > 0].numel()
        else:  # equal
            n = int(torch.equal(m, m.abs()))
        return m * 2 if n > 3 else m


@pytest.mark.parametrize("form", ["tolist", "nonzero", "mask", "equal"])
def test_values_from_data_are_not_sizes(form: str) -> None:
    with pytest.raises(TraceError, match="computed from a tensor's data"):
        trace_model(DataSized(form).eval(), (torch.randn(4, 3, 7, 7),))


class PerSample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = torch.stack([t * 2 for t in h.unbind(0)])  # a loop over the batch
        if h.shape[-1] % 2:
            h = F.pad(h, (0, 1))
        return self.b(h).mean((2, 3))


def test_a_loop_over_the_batch_is_guarded_to_its_length() -> None:
    """unbind(0) gives as many tensors as the example's batch: the graph computes that
    many, and stops at a guard on another batch instead of dropping samples."""
    model, x = PerSample().eval(), torch.randn(2, 3, 7, 7)
    gm = trace_model(model, (x,))
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-6
        with pytest.raises(AssertionError, match="another branch"):
            gm(torch.randn(4, 3, 7, 7))


class Stateful(nn.Module):
    """Updates a buffer in forward (eval too) and pads by a size."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.register_buffer("ema", torch.zeros(16, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(1.0)  # writes into its input
        h = self.a(x)
        self.ema.add_(h.mean((0, 2, 3))[:, None, None], alpha=0.5)
        if h.shape[-1] % 2:
            h = F.pad(h, (0, 1))
        return self.b(h - self.ema).mean((2, 3))


def test_state_written_in_forward_is_traced_and_left_as_it_was() -> None:
    """The in-place buffer update stays in the graph (its result is unused: dead-code
    elimination dropped it, and the graph subtracted a buffer that never moved), the
    tracer's runs leave the buffer and the caller's inputs as they were, and two calls
    of the graph give what two calls of the model give."""
    model, x = Stateful().eval(), torch.randn(2, 3, 7, 7)
    before = x.clone()
    gm = trace_model(model, (x,))
    assert torch.equal(x, before)
    assert torch.equal(gm.ema, torch.zeros(16, 1, 1)) and torch.equal(model.ema, gm.ema)
    with torch.no_grad():
        for _ in range(2):
            assert rel_err(gm(x.clone()), model(x.clone())) < 1e-6


class Defaults(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.inner, self.b = nn.Conv2d(3, 16, 3, padding=1), DataBranch(), nn.Conv2d(16, 8, 1)

    def forward(s, x: torch.Tensor, flag: bool = True) -> torch.Tensor:  # noqa: N805
        h = s.inner(s.a(x))
        if h.shape[-1] % 2 and flag:
            h = F.pad(h, (0, 1))
        return s.b(h).mean((2, 3))


def test_forward_with_a_default_argument() -> None:
    """The inputs' values follow forward's parameters (a first parameter not named
    self, a default made concrete); the data branch inside stays a leaf."""
    model, x = Defaults().eval(), torch.randn(2, 3, 7, 7)
    gm = trace_model(model, (x,))
    trace = gm.meta[S2H_TRACE]
    assert list(trace["leaves"]) == ["inner"] and trace["guards"]
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-6


class Kwargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.inner = nn.Conv2d(3, 16, 3, padding=1), DataBranch()

    def forward(self, x: torch.Tensor, **kwargs: float) -> torch.Tensor:
        return self.inner(self.a(x)).mean((2, 3)) * kwargs.get("scale", 1.0)


def test_forward_with_kwargs() -> None:
    """``**kwargs`` holds no example value (an empty dict: ``kwargs.get`` works); the
    data branch inside becomes a leaf."""
    from s2h_fx.passes.trace_model import _trace_with_fallback

    _, plan = _trace_with_fallback(Kwargs().eval(), "Kwargs", None, (torch.randn(2, 3, 7, 7),))
    assert list(plan.leaves) == ["inner"]


class DataBranchModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return h.mean((2, 3))


class NoisyPad(nn.Module):
    """A size branch and noise: its traced graph cannot reproduce the model's output."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] % 4:
            h = F.pad(h, (0, 1))
        return h + 0.1 * torch.rand_like(h)


def test_a_valued_trace_that_misses_the_models_output_is_not_used() -> None:
    x = torch.randn(2, 3, 7, 7)
    gm = trace_model(Outer(NoisyPad()).eval(), (x,))
    trace = gm.meta[S2H_TRACE]
    assert list(trace["leaves"]) == ["inner"] and not trace["guards"]


timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")


@pytest.mark.parametrize(("name", "size"), [("tiny_vit_5m_224", 224), ("mobilevit_xxs", 64)])
def test_timm_blocks_with_size_control_flow_prune(name: str, size: int) -> None:
    """TinyViT's and MobileViT's blocks pad and fold by the feature map's size (timm
    registers them as not traceable): they were leaves, their channels frozen (0.71 and
    0.75 of the FLOPs). Now every group but the classifier's prunes."""
    torch.manual_seed(0)
    model, x = timm.create_model(name, pretrained=False, num_classes=10).eval(), torch.randn(1, 3, size, size)
    pruner = s2h_fx.prune_graph(model, 0.5, (x,))
    assert pruner.graph_module.meta[S2H_TRACE]["method"] == "fx, sizes of the example"
    assert len(pruner.grouping.frozen) == 1
    exported = pruner.eval().export()
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < 1e-5
        assert exported(torch.randn(2, 3, size, size)).shape == (2, 10)
    assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)
    assert float(pruner.flops_ratio()) <= 0.5 + 0.005


class PadInner(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.pad(h, (0, 1)) if h.shape[-1] % 2 else h


def test_no_valued_trace_above_the_parameter_threshold(monkeypatch) -> None:
    """Valued tracing runs the model for real: above VALUED_TRACE_PARAMS it is not
    tried, and a submodule with control flow on sizes becomes a leaf as before."""
    import importlib

    tm = importlib.import_module("s2h_fx.passes.trace_model")
    model, x = Outer(PadInner()).eval(), torch.randn(2, 3, 7, 7)
    assert trace_model(model, (x,)).meta[S2H_TRACE]["method"] == "fx, sizes of the example"
    monkeypatch.setattr(tm, "VALUED_TRACE_PARAMS", 100)
    trace = trace_model(model, (x,)).meta[S2H_TRACE]
    assert trace["method"] == "leaf fallback" and list(trace["leaves"]) == ["inner"]


class FixedMask(nn.Module):
    """A padding mask built from sizes (NaFlex style: all tokens valid on a dense grid),
    a branch on it, and a buffer expanded to the batch."""

    def __init__(self, form: str = "ones") -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.register_buffer("scale", torch.rand(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        valid = torch.ones(B, H * W, dtype=torch.bool, device=x.device)
        if self.form == "random":  # random values are not fixed by the sizes
            valid = torch.rand(B, H * W, device=x.device) < 2
        elif self.form == "written":  # nor a fixed tensor the data has written into
            valid.logical_and_(x[:, 0].flatten(1) > 0)
        pad = ~valid
        h = self.a(x) * self.scale.expand(B, -1)[:, :, None, None]
        if pad.any():
            h = h.masked_fill(pad.view(B, 1, H, W), 0.0)
        return self.b(h).mean((2, 3))


def test_a_branch_on_a_tensor_the_sizes_fix_is_taken_and_guarded() -> None:
    """torch.ones(B, H * W) with sizes from the input is recorded, a branch on what is
    computed from it alone is decided as on the example (guarded), and a buffer's
    method called with a size is recorded: the model traces whole and prunes."""
    x = torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(FixedMask().eval(), 0.5, (x,), divisor=4)
    trace = pruner.graph_module.meta[S2H_TRACE]
    assert trace["method"] == "fx, sizes of the example" and not trace["leaves"]
    assert len(trace["guards"]) == 1 and "pad.any()" in trace["guards"][0]
    exported = pruner.eval().export()
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < 1e-5
        assert exported(torch.randn(5, 3, 6, 6)).shape == (5, 8)  # batch and size free


@pytest.mark.parametrize("form", ["random", "written"])
def test_a_branch_on_a_tensor_the_sizes_do_not_fix_is_not_decided(form: str) -> None:
    with pytest.raises(TraceError, match="computed from a tensor's data"):
        trace_model(FixedMask(form).eval(), (torch.randn(2, 3, 8, 8),))


class BufferFlag(nn.Module):
    """A branch on a size (the valued trace runs) and one on a buffer's value."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.register_buffer("scaled", torch.tensor(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.shape[-1] % 2:
            h = F.pad(h, (0, 1, 0, 1))
        if self.scaled:
            h = h * 2
        return self.b(h).mean((2, 3))


def test_a_branch_on_a_buffer_is_decided_and_guarded() -> None:
    """A buffer is a constant of the model: the branch on it is taken as it is and
    guarded, so the model traces whole; a buffer changed after tracing stops the
    graph at that guard instead of computing the other branch."""
    x = torch.randn(2, 3, 7, 7)
    pruner = s2h_fx.prune_graph(BufferFlag().eval(), 0.5, (x,), divisor=4)
    trace = pruner.graph_module.meta[S2H_TRACE]
    assert trace["method"] == "fx, sizes of the example" and not trace["leaves"]
    assert any("self.scaled" in g for g in trace["guards"])
    exported = pruner.eval().export()
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < 1e-5
        exported.scaled.fill_(False)
        with pytest.raises(AssertionError, match="another branch at .*self.scaled"):
            exported(x)

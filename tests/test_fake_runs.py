"""Runs on fake tensors in the prepare pass (s2h_fx.fake): the tracer's eager
observation run (how nn.MultiheadAttention / nn.Transformer modules are called) where
every module is torch's or torchvision's, and shape / FLOPs propagation for large
models; each for real otherwise, or when the fake run fails."""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import s2h_fx.observe as observe
from s2h_fx.channels import S2H_FLOPS, S2H_VALUE
from s2h_fx.fake import fake_mode, graph_is_fake_safe, holds_fake, modules_are_fake_safe
from s2h_fx.passes.trace_model import propagate, trace_model

from toy_zoo import TOY_ZOO

# the module (``s2h_fx.passes.trace_model`` as an attribute is the function of that name)
trace_pass = importlib.import_module("s2h_fx.passes.trace_model")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16,
        mlp_dim=32, num_classes=5).eval()


@pytest.fixture
def watch_attention(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The tensor type of each nn.MultiheadAttention call the observation run makes
    (read through the tracer's recorder: a hook on the model would change it)."""
    from s2h_fx import mha

    seen: list[type] = []
    select, describe = mha.RECORDER

    def spy(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        seen.append(type(args[0]))
        return describe(m, args, kwargs)

    monkeypatch.setattr(mha, "RECORDER", (select, spy))
    return lambda model: seen


def inlined(gm: Any) -> bool:
    return not [n for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(str(n.target)), nn.MultiheadAttention)]


def test_torchvision_vit_is_observed_on_fake_tensors(watch_attention: Any) -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    model = tiny_vit()
    assert modules_are_fake_safe(model)
    seen = watch_attention(model)
    x = torch.randn(2, 3, 32, 32)
    gm = trace_model(model, (x,))
    assert seen and all(t is FakeTensor for t in seen)  # no real arithmetic to observe
    assert inlined(gm) and not holds_fake(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_observation_runs_for_real_when_the_fake_run_fails(
        monkeypatch: pytest.MonkeyPatch, watch_attention: Any) -> None:
    @contextlib.contextmanager
    def failing() -> Any:
        raise RuntimeError("no fake kernel")
        yield  # pragma: no cover

    monkeypatch.setattr(observe, "fake_mode", failing)
    model = tiny_vit()
    seen = watch_attention(model)
    gm = trace_model(model, (torch.randn(2, 3, 32, 32),))
    assert seen and all(t is torch.Tensor for t in seen)
    assert inlined(gm)  # the calls were still observed


def test_a_model_with_modules_of_its_own_is_observed_for_real(watch_attention: Any) -> None:
    class Mine(nn.Module):  # could cache a tensor in eval mode: never run fake
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    model = Mine().eval()
    assert not modules_are_fake_safe(model)
    seen = watch_attention(model)
    gm = trace_model(model, (torch.randn(2, 5, 16),))
    assert seen == [torch.Tensor] and inlined(gm)


def test_holds_fake_finds_a_cached_fake_tensor() -> None:
    m = nn.Linear(2, 2)
    m.cache = {"cpu": torch.zeros(2)}  # type: ignore[assignment]
    assert not holds_fake(m)
    with fake_mode():
        m.cache["cpu"] = m(torch.zeros(1, 2))  # type: ignore[index]
    assert holds_fake(m)


def _meta(gm: Any) -> dict[str, Any]:
    """What propagation records and the passes read: shapes, dtypes, FLOPs, values
    (not strides: a size-1 axis's stride differs between fake and real runs)."""
    def shape(m: Any) -> Any:
        if hasattr(m, "shape"):  # a TensorMetadata (itself a tuple)
            return tuple(m.shape), m.dtype
        return tuple(shape(v) for v in m) if isinstance(m, (tuple, list)) else m
    return {n.name: (shape(n.meta.get("tensor_meta")), n.meta.get(S2H_FLOPS),
                     n.meta.get(S2H_VALUE, "-")) for n in gm.graph.nodes}


@pytest.mark.parametrize("name", sorted(TOY_ZOO))
def test_meta_propagation_records_what_the_real_one_does(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make_model, make_input = TOY_ZOO[name]
    torch.manual_seed(0)
    model, x = make_model().eval(), make_input()
    gm = trace_model(model, (x,))  # small: real
    real = _meta(gm)
    monkeypatch.setattr(trace_pass, "META_PROPAGATION_PARAMS", 0)
    ran_fake: list[bool] = []
    original = trace_pass._FlopShapeProp.__init__

    def spy(self: Any, gm: Any, meta: bool = False) -> None:
        ran_fake.append(meta)
        original(self, gm, meta)

    monkeypatch.setattr(trace_pass._FlopShapeProp, "__init__", spy)
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
        n.meta.pop(S2H_FLOPS, None)
    propagate(gm, (x,))
    assert ran_fake[0] == graph_is_fake_safe(gm, (x,))
    assert _meta(gm) == real


def test_large_model_propagates_on_meta_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """From META_PROPAGATION_PARAMS parameters up (lowered here to the tiny ViT's): no
    node computes (every op's output in the run is a meta tensor); the same records;
    the model's own tensors are back afterwards, and unchanged."""
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    real = _meta(trace_model(model, (x,)))
    monkeypatch.setattr(trace_pass, "META_PROPAGATION_PARAMS",
                        sum(p.numel() for p in model.parameters()))
    outputs: list[torch.Tensor] = []
    original = trace_pass._FlopShapeProp.run_node

    def spy(self: Any, n: Any) -> Any:
        out = original(self, n)
        if isinstance(out, torch.Tensor) and n.op.startswith("call_"):
            outputs.append(out)
        return out

    monkeypatch.setattr(trace_pass._FlopShapeProp, "run_node", spy)
    gm = trace_model(model, (x,))
    assert outputs and all(o.is_meta for o in outputs)
    assert _meta(gm) == real and not trace_pass.holds_meta(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_meta_propagation_falls_back_where_an_op_needs_data(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A size that depends on values (boolean indexing) has no fake answer: the run
    starts over for real and records the real sizes."""

    class Selects(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y[y > 0].sum() + y.mean()

    monkeypatch.setattr(trace_pass, "META_PROPAGATION_PARAMS", 0)
    x = torch.randn(2, 3, 8, 8)
    model = Selects().eval()
    with caplog.at_level("INFO", logger=trace_pass.log.name):
        gm = trace_model(model, (x,))
    assert "on meta tensors failed" in caplog.text
    node = next(n for n in gm.graph.nodes if n.op == "call_function"
                and n.target.__name__ == "getitem")
    assert node.meta["tensor_meta"].shape == (int((model.conv(x) > 0).sum()),)


def spectral_transformer() -> nn.Module:
    """torch modules only, but spectral_norm's forward pre-hook stores the weight it
    computes on the module: a fake run would leave a fake weight there."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.utils.spectral_norm(nn.Linear(16, 16)),
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)).eval()


def test_a_module_with_hooks_is_observed_for_real(watch_attention: Any) -> None:
    model = spectral_transformer()
    assert not modules_are_fake_safe(model)
    seen = watch_attention(model)
    x = torch.randn(2, 5, 16)
    gm = trace_model(model, (x,))
    assert seen and all(t is torch.Tensor for t in seen)
    assert inlined(gm) and not holds_fake(gm)


def test_meta_propagation_leaves_no_meta_tensor_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the parameter threshold, a graph calling a hooked module runs for real; a
    meta tensor found after a meta run (kept by anything) means a real run."""
    monkeypatch.setattr(trace_pass, "META_PROPAGATION_PARAMS", 0)
    model, x = spectral_transformer(), torch.randn(2, 5, 16)
    gm = trace_model(model, (x,))
    assert not graph_is_fake_safe(gm, (x,)) and not trace_pass.holds_meta(gm)
    monkeypatch.setattr(trace_pass, "graph_is_fake_safe", lambda *a: True)  # force it
    propagate(gm, (x,))
    assert not trace_pass.holds_meta(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.rnn = nn.Linear(8, 16), nn.LSTM(16, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.a(x))[0]


def test_a_graph_with_an_rnn_propagates_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """An LSTM counts no FLOPs on the CPU (its fused kernel has no formula) and counts
    its matrix products on meta tensors: such a graph runs for real, so the FLOPs
    model counts what flop_counter says of the exported network (timm's sequencer2d
    had its frozen LSTMs counted at 0.51 of its FLOPs: a BudgetError at 0.5)."""
    monkeypatch.setattr(trace_pass, "META_PROPAGATION_PARAMS", 0)
    x = torch.randn(2, 5, 8)
    gm = trace_model(_Recurrent().eval(), (x,))
    counted = {n.name: n.meta.get(S2H_FLOPS) for n in gm.graph.nodes if n.op == "call_module"}
    assert counted["rnn"] == 0 and counted["a"] > 0
    with FlopCounterMode(display=False) as real:
        _Recurrent()(x)
    assert sum(counted.values()) == real.get_total_flops()

"""The tracer's eager observation run (how nn.MultiheadAttention / nn.Transformer
modules are called) runs on fake tensors where every module is torch's or
torchvision's, and for real otherwise or when the fake run fails."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import s2h_fx.observe as observe
from passes.trace_model import trace_model
from s2h_fx.fake import fake_mode, holds_fake, modules_are_fake_safe


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16,
        mlp_dim=32, num_classes=5).eval()


def watch_attention(model: nn.Module) -> list[type]:
    """The tensor type each nn.MultiheadAttention call gets, appended per call."""
    seen: list[type] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(args[0], torch.Tensor):  # not a tracing proxy
            seen.append(type(args[0]))

    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.register_forward_pre_hook(hook)
    return seen


def inlined(gm: Any) -> bool:
    return not [n for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(str(n.target)), nn.MultiheadAttention)]


def test_torchvision_vit_is_observed_on_fake_tensors() -> None:
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


def test_observation_runs_for_real_when_the_fake_run_fails(monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_a_model_with_modules_of_its_own_is_observed_for_real() -> None:
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

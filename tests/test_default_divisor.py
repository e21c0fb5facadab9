"""The divisor a run gets when none is given: 8, or a latency budget's runtime's own
(32 on the CPU, where measured; 8 on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s2h_fx import cli, prune_graph
from s2h_fx.bench import _check_args
from s2h_fx.channels import FreezeReason
from s2h_fx.config import DEFAULT_DIVISOR, RUNTIME_DIVISORS, PruneConfig, default_divisor


def test_flops_and_params_budgets_default_to_8() -> None:
    assert DEFAULT_DIVISOR == 8
    assert PruneConfig(0.5).divisor == 8
    assert PruneConfig({"params": 0.5}).divisor == 8


def test_latency_budget_takes_its_runtimes_divisor() -> None:
    # measured: every CPU runtime runs widths in steps of 32 closest to their FLOPs
    for runtime in ("onnxruntime", "eager", "compile"):
        assert RUNTIME_DIVISORS[(runtime, "cpu")] == 32
        assert PruneConfig({"latency": 0.5, "runtime": runtime}).divisor == 32
        # not measured on a GPU: the general default
        assert PruneConfig({"latency": 0.5, "runtime": runtime, "device": "cuda:0"}).divisor == 8
    assert default_divisor("onnxruntime", "cpu") == 32 and default_divisor(None) == 8
    assert default_divisor("tensorrt", "cuda") == 8


def test_an_explicit_divisor_wins_and_is_checked() -> None:
    assert PruneConfig({"latency": 0.5, "runtime": "onnxruntime"}, divisor=8).divisor == 8
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="divisor must be a positive integer"):
            PruneConfig(0.5, divisor=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("runtimes", "want"), [
    ("eager", 32), ("onnxruntime", 32), ("eager,onnxruntime", 32), ("compile", 32)])
def test_bench_default_divisor_suits_every_runtime_timed(runtimes: str, want: int) -> None:
    parser = cli._build_parser()
    args = parser.parse_args(["bench", "resnet18", "--budget", "0.5", "--runtime", runtimes])
    assert args.divisor is None
    _check_args(args)
    assert args.divisor == want
    args = parser.parse_args(["bench", "resnet18", "--budget", "0.5", "--runtime", runtimes,
                              "--divisor", "16"])
    _check_args(args)
    assert args.divisor == 16


class _Widths(nn.Module):
    """Three conv groups: 184 channels (not a multiple of 32), 64 (one), 24 (below 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 184, 3, padding=1), nn.Conv2d(184, 64, 1)
        self.c, self.head = nn.Conv2d(64, 24, 1), nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(self.b(self.a(x).relu()).relu()).relu())


def test_a_group_steps_by_what_keeps_the_runs_multiples() -> None:
    """At divisor 32 a 184-channel group steps by gcd(184, 32) = 8, so 32, 64, ... 160
    stay widths (the divisor lowered until it divides 184 would be 23: no multiple of
    32 reachable); 64 keeps 32; 24, under one step of 32, stays whole."""
    x = torch.randn(2, 3, 8, 8)
    pruner = prune_graph(_Widths().eval(), 0.5, example_inputs=(x,), divisor=32)
    by_member = {m: g for g in pruner.grouping.groups for m in g.members}
    assert by_member["a:out"].divisor == 8 and by_member["a:out"].prunable
    assert by_member["b:out"].divisor == 32
    small = by_member["c:out"]
    assert not small.prunable and any(FreezeReason.TOO_SMALL.value in w for w in small.frozen)
    assert all(w % 8 == 0 for w in pruner.widths.values())
    pruner.eval()
    with torch.no_grad():
        assert torch.allclose(pruner.export()(x), pruner(x), atol=1e-5)

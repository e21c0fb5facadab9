"""The divisor a run gets when none is given: 8, or a latency budget's runtime's own
(32 on the CPU, where measured; 8 on a GPU)."""

from __future__ import annotations

import pytest

from s2h_fx import cli
from s2h_fx.bench import _check_args
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

"""The timing helper's mechanics, driven by a fake clock (no wall time is measured)."""

from __future__ import annotations

import pytest
import torch

from s2h_fx.timing import (
    CpuTimer,
    CudaTimer,
    Timing,
    environment,
    interleaved_order,
    time_interleaved,
    timer_for,
)


class FakeClock:
    """A clock that only moves when a fake network runs."""

    def __init__(self) -> None:
        self.now = 100.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def network(self, name: str, durations: list[float]) -> object:
        """A callable that takes durations[k] seconds on its k-th call (the last one repeats)."""
        def run() -> None:
            k = sum(1 for c in self.calls if c == name)
            self.calls.append(name)
            self.now += durations[min(k, len(durations) - 1)]
        return run


def test_medians_from_interleaved_rounds_skip_the_warm_up() -> None:
    clock = FakeClock()
    # the first 2 calls of each network are slow (a cold cache): warm-up must absorb them
    fns = {"dense": clock.network("dense", [1.0, 1.0, 0.004]),
           "pruned": clock.network("pruned", [1.0, 1.0, 0.001])}
    result = time_interleaved(fns, batch=8, rounds=5, warmup=2, timer=CpuTimer(clock))
    assert clock.calls.count("dense") == clock.calls.count("pruned") == 7
    assert len(result["dense"].samples) == len(result["pruned"].samples) == 5
    assert result["dense"].median_ms == pytest.approx(4.0)
    assert result["pruned"].median_ms == pytest.approx(1.0)
    assert result["pruned"].throughput == pytest.approx(8 / 0.001)
    # interleaved: every round (after the 2 warm-up rounds) runs each network once
    timed = clock.calls[4:]
    for r in range(5):
        assert sorted(timed[2 * r:2 * r + 2]) == ["dense", "pruned"]


def test_rounds_rotate_the_order() -> None:
    clock = FakeClock()
    names = ["a", "b", "c"]
    fns = {n: clock.network(n, [0.001]) for n in names}
    time_interleaved(fns, batch=1, rounds=4, warmup=0, timer=CpuTimer(clock))
    assert clock.calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert interleaved_order(names, 5) == ["c", "a", "b"]


def test_slow_period_falls_on_every_network() -> None:
    """A burst of load during round 1 slows whichever network runs then; with rounds
    interleaved each network gets one slow sample and the medians are untouched."""
    clock = FakeClock()
    base = {"a": 0.002, "b": 0.003}

    def network(name: str) -> object:
        def run() -> None:
            clock.calls.append(name)
            round_index = (len(clock.calls) - 1) // 2
            clock.now += base[name] * (50 if round_index == 1 else 1)
        return run

    result = time_interleaved({n: network(n) for n in base}, batch=1, rounds=5, warmup=0,
                              timer=CpuTimer(clock))
    assert result["a"].median_ms == pytest.approx(2.0)
    assert result["b"].median_ms == pytest.approx(3.0)
    assert max(result["a"].samples) == pytest.approx(0.1)


def test_p90_and_summary() -> None:
    # samples 1..10 ms: median 5.5, 90th percentile (linear) 9 + 0.1 * (10 - 9) = 9.1
    timing = Timing(tuple(k / 1e3 for k in range(1, 11)), batch=4)
    assert timing.median_ms == pytest.approx(5.5)
    assert timing.p90_ms == pytest.approx(9.1)
    assert timing.summary() == pytest.approx(
        {"median_ms": 5.5, "p90_ms": 9.1, "throughput": 4 / 0.0055, "samples": 10})


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch >= 1"):
        time_interleaved({"a": lambda: None}, batch=0)
    with pytest.raises(ValueError, match="rounds >= 1"):
        time_interleaved({"a": lambda: None}, batch=1, rounds=0)


def test_timer_choice_and_real_clock() -> None:
    assert isinstance(timer_for("cpu"), CpuTimer)
    assert isinstance(timer_for("cuda:0"), CudaTimer)
    assert CpuTimer()(lambda: sum(range(1000))) >= 0.0


def test_environment_records_threads_load_and_versions() -> None:
    env = environment("cpu")
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert len(env["load_average"]) == 3 and env["cpu_count"] >= 1
    assert env["device"] == "cpu" and "gpu" not in env
    assert {"onnxruntime", "torch_tensorrt", "tensorrt", "cpu", "python"} <= set(env)


def test_environment_names_runtime_versions_not_yet_imported() -> None:
    """The versions come from the installed packages: in a fresh process that has not
    imported ONNX Runtime, the figure (and the latency cache key) still names it."""
    import subprocess
    import sys
    from importlib import metadata

    expected = metadata.version("onnxruntime")  # in the [dev] extra
    code = ("import sys; from s2h_fx.timing import environment; "
            "assert 'onnxruntime' not in sys.modules; print(environment()['onnxruntime'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == expected

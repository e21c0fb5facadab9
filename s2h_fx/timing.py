"""Latency of several networks measured fairly: warm-up, then interleaved rounds.

Each round calls every network once, in an order rotated by one place per
round, so a slow period of the machine (another process, thermal throttling)
falls on all networks alike instead of on whichever was timed last. Every call
is one sample: on CPU a pair of clock readings (``time.perf_counter`` unless a
clock is injected, which is how the tests drive it); on CUDA a pair of CUDA
events around the call with the device synchronised before it and the end
event waited for after it. Results are the median and the 90th percentile of
the samples, and the throughput the median implies.

:func:`environment` records what a figure depends on: threads, load average,
versions (torch, ONNX Runtime, torch-tensorrt, TensorRT), CPU and GPU names.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Timer(Protocol):
    """Seconds that one call of ``fn`` takes."""

    def __call__(self, fn: Callable[[], Any]) -> float: ...


@dataclass(frozen=True)
class CpuTimer:
    """Wall time of one call, from ``clock`` (seconds; ``time.perf_counter`` by default)."""

    clock: Clock = time.perf_counter

    def __call__(self, fn: Callable[[], Any]) -> float:
        start = self.clock()
        fn()
        return self.clock() - start


@dataclass(frozen=True)
class CudaTimer:
    """Device time of one call: CUDA events around it, the device synchronised before it
    (so no earlier work is counted) and the end event waited for after it."""

    device: torch.device | str = "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize(self.device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def timer_for(device: torch.device | str) -> Timer:
    """CUDA events on a CUDA device, ``perf_counter`` elsewhere."""
    return CudaTimer(device) if torch.device(device).type == "cuda" else CpuTimer()


@dataclass(frozen=True)
class Timing:
    """Latency samples of one network (seconds) and what they say."""

    samples: tuple[float, ...]
    batch: int

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples)) * 1e3

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.samples, 90)) * 1e3

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch / (self.median_ms / 1e3)

    def summary(self) -> dict[str, float | int]:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms,
                "throughput": self.throughput, "samples": len(self.samples)}


def interleaved_order(names: list[str], round_index: int) -> list[str]:
    """The networks of round ``round_index``: the list rotated by one place per round."""
    k = round_index % len(names) if names else 0
    return names[k:] + names[:k]


def time_interleaved(fns: Mapping[str, Callable[[], Any]], batch: int, *, rounds: int = 30,
                     warmup: int = 5, timer: Timer | None = None,
                     device: torch.device | str = "cpu") -> dict[str, Timing]:
    """Time every callable in ``fns`` over ``rounds`` interleaved rounds, after ``warmup``
    untimed calls each (also interleaved). ``batch`` is the images per call, for the
    throughput. ``timer`` defaults to :func:`timer_for` ``(device)``."""
    if batch < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, rounds >= 1, warmup >= 0; got {batch}, {rounds}, "
                         f"{warmup}")
    names = list(fns)
    timer = timer if timer is not None else timer_for(device)
    with torch.no_grad():  # not inference_mode: torch.compile would recompile for it
        for i in range(warmup):
            for name in interleaved_order(names, i):
                fns[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        for i in range(rounds):
            for name in interleaved_order(names, i):
                samples[name].append(timer(fns[name]))
    return {name: Timing(tuple(s), batch) for name, s in samples.items()}


# ---- environment -------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
                  "torch_tensorrt": ("torch-tensorrt", "torch_tensorrt"),
                  "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12")}


def _version(module: str) -> str | None:
    """The installed version of ``module`` from the package metadata (no import: importing
    a runtime could be slow or fail), or its ``__version__`` if it is imported; None if
    it is not installed. (Read from imported modules only, ONNX Runtime was missing from
    figures and from the latency cache key whenever nothing had imported it yet.)"""
    from importlib import metadata

    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None) if mod is not None else None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a timing depends on, recorded with every figure."""
    dev = torch.device(device)
    env: dict[str, Any] = {
        "device": str(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "onnxruntime": _version("onnxruntime"),
        "torch_tensorrt": _version("torch_tensorrt"),
        "tensorrt": _version("tensorrt"),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env

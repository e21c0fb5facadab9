"""The latency model: measured latency of the hard network as a function of the widths.

Built like the FLOPs model (:mod:`s2h_fx.passes.build_flops_model`), with each
product of widths replaced by a lookup. Every convolution and linear layer whose
input or output channels depend on a prunable group is a *term*: its latency
on the target runtime is measured alone, at batch ``B``, on a coarse grid of its
input and output channel counts (the axis sizes the groups' widths give, at the
divisor's granularity, from the smallest to the full), and interpolated
(multilinear, extrapolated from the edge cells) between grid points.

Layers timed alone are not layers inside a network: alone, each call also pays
for handing its output back (a copy that grows with the width), and inside a
network there is work no term covers (pooling, element-wise ops, per-op
dispatch) that barely shrinks with the widths. So the model is *calibrated* on
whole networks: the dense network and two uniformly narrowed ones
(:data:`CALIBRATION`) are timed together in interleaved rounds, and
``latency = constant + scale * sum(terms)`` is fitted to them by least squares
(``scale > 0``; the constant is negative when the calls' overheads in the terms
outweigh what the terms miss). On mobilenet_v2 with ONNX Runtime (CPU, one
thread) the terms alone predicted a network at 0.19 of the FLOPs at 0.19 of the
dense latency, where it measured 0.27-0.30. The model has the
:class:`~s2h_fx.cost.CostModel` interface and is differentiable in
straight-through widths.

Measuring is injectable (:class:`Measure`): :class:`RuntimeMeasure` deploys each
layer with :func:`s2h_fx.deploy.deploy` and times it with
:func:`s2h_fx.timing.time_interleaved`; tests pass a known cost function. Layer
timings are cached on disk (:class:`LatencyCache`) in a file keyed by the
measure's key (runtime, device, versions, batch, threads, CPU or GPU): another
key is another file, so a changed key measures again. The calibration is
measured each time the model is built (a few seconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import fx, nn

from s2h_fx.channels import S2H_LAYOUT, ChannelLayout, GroupingResult
from s2h_fx.config import GRID_POINTS
from s2h_fx.errors import InputError
from s2h_fx.passes.build_flops_model import AxisSize, ids_axis_size  # noqa: I001
from s2h_fx.passes.emit_pruned import emit_pruned
from s2h_fx.passes.plan_surgery import plan_surgery

log = logging.getLogger(__name__)

CACHE_SCHEMA = 2  # 2: layer timings include the per-call overhead
DEFAULT_CACHE = Path("~/.cache/s2h-fx")
CALIBRATION = (0.3, 0.6)  # uniform width fractions of the calibration networks (and dense)


@dataclass(frozen=True)
class LayerSpec:
    """What a layer's latency depends on besides its widths: op, full shapes, stride,
    padding, dilation and groups. ``build(sizes)`` makes the layer at new channel
    counts: ``sizes`` follows ``roles`` ("in", "out", or "inout": tied, depthwise)."""

    op: str  # "conv1d" | "conv2d" | "conv3d" | "linear"
    in_shape: tuple[int, ...]  # full-width input at the measured batch
    out_features: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    roles: tuple[str, ...] = ()

    def key(self) -> str:
        return (f"{self.op} in{list(self.in_shape)} out{self.out_features} k{list(self.kernel)} "
                f"s{list(self.stride)} p{list(self.padding)} d{list(self.dilation)} "
                f"g{self.groups} b{int(self.bias)} {'/'.join(self.roles)}")

    def channels(self, sizes: tuple[int, ...]) -> tuple[int, int, int]:
        """(input channels, output channels, groups) at ``sizes``."""
        dim = -1 if self.op == "linear" else 1
        cin, cout, groups = self.in_shape[dim], self.out_features, self.groups
        for role, s in zip(self.roles, sizes):
            if role in ("in", "inout"):
                cin = s
            if role in ("out", "inout"):
                cout = s
        if self.groups > 1:
            per_group = self.in_shape[dim] // self.groups
            groups = max(1, cin // per_group)
            cout = max(groups, cout // groups * groups)
        return cin, cout, groups

    def build(self, sizes: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
        cin, cout, groups = self.channels(sizes)
        if self.op == "linear":
            x = torch.randn(*self.in_shape[:-1], cin)
            return nn.Linear(cin, cout, bias=self.bias).eval(), x
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.op]
        layer = conv(cin, cout, self.kernel, self.stride, self.padding, self.dilation,  # type: ignore[arg-type]
                     groups, self.bias)
        return layer.eval(), torch.randn(self.in_shape[0], cin, *self.in_shape[2:])


class Measure(Protocol):
    """Seconds one call takes on the target runtime, and what the figures depend on."""

    def key(self) -> dict[str, Any]: ...

    def layer(self, spec: LayerSpec, sizes: tuple[int, ...]) -> float: ...

    def network(self, module: nn.Module, x: torch.Tensor) -> float: ...

    def networks(self, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
        """Seconds of each network, timed together (interleaved rounds)."""
        ...


# ---- the model -----------------------------------------------------------------
def interpolate(grids: tuple[tuple[float, ...], ...], table: np.ndarray,
                values: tuple[Any, ...]) -> Any:
    """Multilinear interpolation of ``table`` (one axis per grid) at ``values`` (numbers
    or tensors; the result keeps their gradient). Outside a grid the edge cell's
    linear trend goes on; an axis of one point is constant."""
    cells, weights = [], []
    for grid, v in zip(grids, values):
        g = np.asarray(grid, dtype=float)
        if len(g) == 1:
            cells.append((0, 0))
            weights.append((1.0, 0.0))
            continue
        x = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
        i = int(np.clip(np.searchsorted(g, x) - 1, 0, len(g) - 2))
        t = (v - float(g[i])) / float(g[i + 1] - g[i])  # keeps a tensor's dtype
        cells.append((i, i + 1))
        weights.append((1 - t, t))
    value: Any = 0.0
    for corner in itertools.product((0, 1), repeat=len(cells)):
        w: Any = 1.0
        for axis, c in enumerate(corner):
            w = w * weights[axis][c]
        idx = tuple(cells[axis][c] for axis, c in enumerate(corner))
        value = value + w * float(table[idx])
    return value


@dataclass(frozen=True)
class LatencyTerm:
    """One layer: its measured latency over a grid of its channel counts."""

    node: str
    spec: LayerSpec
    axes: tuple[AxisSize, ...]  # the layer's channel counts as functions of the widths
    grids: tuple[tuple[int, ...], ...]
    table: np.ndarray  # seconds, shape = grid lengths

    @property
    def groups(self) -> frozenset[int]:
        return frozenset(g for a in self.axes for g, _ in a.coefs)

    @property
    def base(self) -> float:
        """Latency at full width."""
        return float(self.table[tuple(len(g) - 1 for g in self.grids)])

    def at(self, widths: dict[int, Any], sizes: dict[int, int]) -> Any:
        values = tuple(a.at(widths, sizes) for a in self.axes)
        return interpolate(tuple(tuple(map(float, g)) for g in self.grids), self.table, values)


@dataclass(frozen=True)
class LatencyModel:
    """Latency of the hard network (seconds): ``constant + scale * sum(terms)``, the
    calibration fitted to whole networks (see the module's docstring). The interface
    of :class:`~s2h_fx.passes.build_flops_model.FlopsModel`."""

    terms: tuple[LatencyTerm, ...]
    constant: float
    sizes: dict[int, int]
    measured_dense: float  # the dense network's measured latency
    scale: float = 1.0
    # (uniform width fraction, measured seconds, model seconds) of the calibration networks
    calibration: tuple[tuple[float, float, float], ...] = ()
    # (predicted ratio, measured ratio) of each network timed by Pruner.land_latency_budget
    # and Pruner.recalibrate_latency, in order
    landings: tuple[tuple[float, float], ...] = ()

    @property
    def total(self) -> float:
        return self.constant + self.scale * sum(t.base for t in self.terms)

    def __call__(self, widths: dict[int, Any]) -> Any:
        w = {**self.sizes, **widths}
        value: Any = 0.0
        for t in self.terms:
            value = value + t.at(w, self.sizes)
        return self.constant + self.scale * value

    def ratio(self, widths: dict[int, Any]) -> Any:
        return self(widths) / self.total


# ---- the cache -----------------------------------------------------------------
class LatencyCache:
    """Layer timings on disk, one JSON file per key (``latency-<hash>.json`` in
    ``directory``); a file whose stored key differs is ignored and rewritten."""

    def __init__(self, directory: str | Path | None, key: dict[str, Any]) -> None:
        self.key = {"schema": CACHE_SCHEMA, **key}
        text = json.dumps(self.key, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        root = Path(directory if directory is not None else DEFAULT_CACHE).expanduser()
        self.path = root / f"latency-{digest}.json"
        self.entries: dict[str, float] = self._load()
        self.dirty = False

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if json.loads(json.dumps(self.key, sort_keys=True, default=str)) != data.get("key"):
            log.info("latency cache %s is for another key: measuring again", self.path)
            return {}
        return {str(k): float(v) for k, v in data.get("entries", {}).items()}

    def get(self, entry: str, measure: Callable[[], float]) -> float:
        if entry not in self.entries:
            self.entries[entry] = float(measure())
            self.dirty = True
        return self.entries[entry]

    def save(self) -> None:
        """Write the file atomically (temp file, rename) if anything was measured."""
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"key": self.key, "entries": self.entries}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True, default=str)
        os.replace(tmp, self.path)
        self.dirty = False


# ---- building ------------------------------------------------------------------
_CONVS: dict[type[nn.Module], str] = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d",
                                     nn.Conv3d: "conv3d"}


def _channel_axis(node: Any, dim: int, grouping: GroupingResult,
                  sizes: dict[int, int]) -> AxisSize | None:
    lay = node.meta.get(S2H_LAYOUT) if isinstance(node, fx.Node) else None
    if not isinstance(lay, ChannelLayout):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    f = lay.factor_at(dim % len(tm.shape))
    if f is None:
        return None
    size = ids_axis_size(f.ids, f.axes.index(dim % len(tm.shape)), grouping, sizes)
    return size if size.coefs else None


def _spec(node: fx.Node, module: nn.Module, batch: int) -> LayerSpec | None:
    src = node.args[0] if node.args else None
    tm = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
    if tm is None or not hasattr(tm, "shape"):
        return None
    shape = (batch, *tuple(tm.shape)[1:])
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", shape, module.out_features, bias=module.bias is not None)
    op = _CONVS.get(type(module))
    if op is None or not isinstance(module.padding, tuple):  # padding="same" etc.: skip
        return None
    m: Any = module
    return LayerSpec(op, shape, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                     tuple(m.padding), tuple(m.dilation), m.groups, m.bias is not None)


def _axes(node: fx.Node, spec: LayerSpec, grouping: GroupingResult,
          sizes: dict[int, int]) -> tuple[tuple[str, ...], tuple[AxisSize, ...]]:
    dim = -1 if spec.op == "linear" else 1
    ax_in = _channel_axis(node.args[0], dim, grouping, sizes)
    ax_out = _channel_axis(node, dim, grouping, sizes)
    if ax_in is not None and ax_in == ax_out:
        return ("inout",), (ax_in,)
    if spec.groups > 1 and (ax_in is None) != (ax_out is None):
        return ("inout",), tuple(a for a in (ax_in, ax_out) if a is not None)
    roles = tuple(r for r, a in (("in", ax_in), ("out", ax_out)) if a is not None)
    return roles, tuple(a for a in (ax_in, ax_out) if a is not None)


def axis_grid(axis: AxisSize, grouping: GroupingResult, sizes: dict[int, int],
              points: int = GRID_POINTS) -> tuple[int, ...]:
    """Grid of an axis's sizes: ``points`` values from its smallest size (every group at
    its divisor) to full, each a whole number of divisor steps from the smallest."""
    smallest = float(axis.at({g: grouping.groups[g].divisor for g, _ in axis.coefs}, sizes))
    step = min(c * grouping.groups[g].divisor for g, c in axis.coefs)
    full = axis.full
    n_steps = max(0, round((full - smallest) / step))
    ks = sorted({round(k) for k in np.linspace(0, n_steps, max(2, points))})
    values = [round(full - (n_steps - k) * step) for k in ks]
    return tuple(sorted({max(1, v) for v in values}))


def monotone(table: np.ndarray) -> np.ndarray:
    """The lower monotone envelope of measured timings: each entry becomes the smallest
    at its widths or wider, along every axis. Timing noise only ever adds time, so
    a narrower layer that measured slower than a wider one is noise; and the
    one-shot chooser needs a cost that does not grow as widths shrink."""
    out = np.asarray(table, dtype=float)
    for axis in range(out.ndim):
        flipped = np.flip(out, axis)
        out = np.flip(np.minimum.accumulate(flipped, axis=axis), axis)
    return out


@dataclass(frozen=True)
class LatencyOptions:
    """How the tables are built: grid points per axis, and where they are cached."""

    points: int = GRID_POINTS
    cache_dir: str | Path | None = None


def build_latency_model(gm: fx.GraphModule, grouping: GroupingResult, x: torch.Tensor,
                        measure: Measure, options: LatencyOptions | None = None) -> LatencyModel:
    """Measure the terms of ``gm`` (dense, traced, grouped) on ``measure``'s runtime at the
    batch of ``x`` and return the latency model; layer timings come from the cache
    where it holds them."""
    options = options or LatencyOptions()
    sizes = {g.index: g.size for g in grouping.prunable}
    cache = LatencyCache(options.cache_dir, measure.key())
    terms = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        spec = _spec(node, module, x.shape[0])
        if spec is None:
            continue
        roles, axes = _axes(node, spec, grouping, sizes)
        if not axes:
            continue
        spec = LayerSpec(**{**spec.__dict__, "roles": roles})
        grids = tuple(axis_grid(a, grouping, sizes, options.points) for a in axes)
        table = np.zeros(tuple(len(g) for g in grids))
        for idx in itertools.product(*(range(len(g)) for g in grids)):
            sz = tuple(int(grids[a][i]) for a, i in enumerate(idx))
            table[idx] = cache.get(f"{spec.key()} @ {list(sz)}",
                                   lambda s=sz, sp=spec: measure.layer(sp, s))  # type: ignore[misc]
        terms.append(LatencyTerm(node.name, spec, axes, grids, monotone(table)))
    cache.save()
    uncalibrated = LatencyModel(tuple(terms), 0.0, sizes, 0.0)
    networks: dict[str, nn.Module] = {"dense": gm}
    widths = {f: uniform_widths(grouping, f) for f in CALIBRATION}
    for f, w in widths.items():
        keep = first_atoms(grouping, w)
        networks[f"{f:g}"] = emit_pruned(gm, plan_surgery(gm, grouping, keep))
    seconds = measure.networks(networks, x)
    points = [(1.0, seconds["dense"], uncalibrated.total)]
    points += [(f, seconds[f"{f:g}"], float(uncalibrated(w))) for f, w in widths.items()]
    smallest = float(uncalibrated({g.index: g.divisor for g in grouping.prunable}))
    constant, scale = calibrate([(m, s_) for _, m, s_ in points], smallest)
    log.info("latency model: %d terms (%.3g s at full width alone), calibrated on %d whole "
             "networks: %.3g s + %.3g x terms; dense measured %.3g s", len(terms),
             uncalibrated.total, len(points), constant, scale, seconds["dense"])
    return LatencyModel(tuple(terms), constant, sizes, seconds["dense"], scale,
                        tuple(points))


def refit(model: LatencyModel, widths: dict[int, int], measured_ratio: float) -> LatencyModel:
    """``model`` calibrated again through two networks: the dense one (its measured
    seconds unchanged) and the network at ``widths``, measured at ``measured_ratio`` of
    the dense one. The calibration's three networks are uniform; a chosen network is
    not, and sits where the budget is: the line through it and the dense one (a
    secant) predicts best where the one-shot chooser and the resource loss look.
    Far below that point the line may under-predict (even below zero for the
    smallest networks where the true latency curves upward); no budget asks there.
    Unchanged (with a log line) where the two points give no rising line."""
    raw_full = sum(t.base for t in model.terms)
    raw_at = (float(model(widths)) - model.constant) / model.scale
    dense = model.measured_dense
    if raw_full - raw_at > 0 and measured_ratio < 1:
        scale = dense * (1 - measured_ratio) / (raw_full - raw_at)
        return dataclasses.replace(model, constant=dense - scale * raw_full, scale=scale)
    log.info("latency model: no rising line through the dense network and one measured "
             "at %.3f of it; the calibration stays", measured_ratio)
    return model


def measured_ratio(measure: Measure, network: nn.Module, dense: nn.Module,
                   x: torch.Tensor) -> float:
    """The latency of ``network`` over that of ``dense``, timed together (interleaved)."""
    seconds = measure.networks({"dense": dense, "network": network}, x)
    for name, t in seconds.items():
        if not (math.isfinite(t) and t > 0):
            raise InputError(f"the runtime measured {t!r} seconds for the {name!r} network "
                             f"(a latency must be a positive number)")
    return seconds["network"] / seconds["dense"]


def uniform_widths(grouping: GroupingResult, fraction: float) -> dict[int, int]:
    """Every prunable group at ``fraction`` of its size, to its divisor (at least one)."""
    out = {}
    for g in grouping.prunable:
        w = int(round(fraction * g.size / g.divisor)) * g.divisor
        out[g.index] = min(g.size, max(g.divisor, w))
    return out


def first_atoms(grouping: GroupingResult, widths: dict[int, int]) -> dict[int, np.ndarray]:
    """A keep-set of each width made of whole atoms (which ones does not matter to
    latency): the classes of the first atoms."""
    keep = {}
    for g, w in widths.items():
        order = np.argsort(grouping.atom_of_class[g], kind="stable")
        keep[g] = np.sort(order[:w])
    return keep


def calibrate(points: list[tuple[float, float]], floor: float = 0.0) -> tuple[float, float]:
    """``(constant, scale)`` of ``measured = constant + scale * terms`` over ``points``
    ((measured, terms) pairs), least squares with ``scale > 0``. The constant may be
    negative (layers timed alone each pay a call's overhead, which the network pays
    once), but the model must stay above zero down to ``floor``, the terms at the
    smallest widths. Without such a fit (one point, a reversed or degenerate fit),
    the terms are scaled to the first point (the dense network)."""
    measured = np.array([p[0] for p in points], dtype=float)
    terms = np.array([p[1] for p in points], dtype=float)
    if len(points) >= 2 and np.ptp(terms) > 0:
        a = np.stack([np.ones_like(terms), terms], axis=1)
        constant, scale = (float(v) for v in np.linalg.lstsq(a, measured, rcond=None)[0])
        if scale > 0 and constant + scale * floor > 0:
            return constant, scale
    log.warning("latency calibration found no usable fit (measured %s for terms %s): the "
                "terms are scaled to the dense network", measured.tolist(), terms.tolist())
    return 0.0, float(measured[0] / terms[0]) if terms[0] > 0 else 1.0


# ---- measuring on a runtime ----------------------------------------------------
@dataclass
class RuntimeMeasure:
    """Median latency on ``runtime`` (see :mod:`s2h_fx.deploy`), interleaved timing with
    ``timer`` (injectable; the device's default). A layer's figure is the whole call,
    the runtime's per-call overhead included: the calibration removes it (subtracting
    an overhead measured apart, and clamping at 0, zeroed a third of mobilenet_v2's
    table entries and lost their widths' effect)."""

    runtime: str
    device: str = "cpu"
    batch: int = 1
    threads: int | None = None
    rounds: int = 20
    warmup: int = 3
    timer: Any = None

    def key(self) -> dict[str, Any]:
        from s2h_fx.deploy import check_runtime
        from s2h_fx.timing import environment

        check_runtime(self.runtime, self.device)
        env = environment(self.device)
        return {"runtime": self.runtime, "device": self.device, "batch": self.batch,
                "threads": self.threads or torch.get_num_threads(),
                **{k: env.get(k) for k in ("torch", "onnxruntime", "torch_tensorrt",
                                            "tensorrt", "cpu", "gpu", "cuda")}}

    def _time(self, module: nn.Module, x: torch.Tensor) -> float:
        return self.networks({"m": module}, x)["m"]

    def layer(self, spec: LayerSpec, sizes: tuple[int, ...]) -> float:
        module, x = spec.build(sizes)
        return self._time(module, x)

    def network(self, module: nn.Module, x: torch.Tensor) -> float:
        return self._time(module, x)

    def networks(self, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
        from s2h_fx.deploy import deploy
        from s2h_fx.timing import time_interleaved

        runs = {name: deploy(m, x, self.runtime, device=self.device, threads=self.threads).run
                for name, m in modules.items()}
        timings = time_interleaved(runs, x.shape[0], rounds=self.rounds, warmup=self.warmup,
                                   timer=self.timer, device=self.device)
        return {name: t.median_ms / 1e3 for name, t in timings.items()}


def batch_input(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` with ``batch`` rows (its first row repeated)."""
    return x if x.shape[0] == batch else x[:1].expand(batch, *x.shape[1:]).contiguous()

"""Training-step overhead of S2H: one S2H step over one dense step, same model and batch.

- dense step: ``forward + cross-entropy + backward + SGD step`` of the original model;
- S2H step: what ``fit()`` does per batch: ``soft, hard = pruner(x)`` (both
  branches; written out as ``sync_from_masks(); soft_forward(x); hard_forward(x)``,
  which is what ``pruner(x)`` runs in training mode, so that each part is timed),
  ``pruner.losses``, ``pruner.backward`` (decoupled), ``opt.step()``,
  ``pruner.mask_step()``.

Both use SGD with momentum 0.9 over the same weights' shapes, the same input batch
and labels, in the same process, interleaved step by step (the order rotated each
repetition), after ``--warmup`` untimed steps of each; the ratio is the median S2H
step over the median dense step. Hard-branch width states:

- ``budget`` (default): the masks at the budget's initial widths with full
  confidence (``set_widths``), as during most of training; this is where the goal
  ``1 + budget + 0.3`` applies;
- ``full``: the masks at full width (``reset_full_width()``, S2H's initialisation):
  the hard branch is the whole network, the first steps of training.

A fourth step, timed in the same rotation, runs the hard branch alone
(forward + cross-entropy + backward into the weights, on a copy of the pruner at
the budget widths): with it the report gives the floor of the exact decoupled
step, ``1 + hard alone / dense + G_s pass / dense``. The G_s pass is a second
backward through the soft graph: the logits need d(L + G_s)/du while the weights
must get d(L)/dtheta from the same graph, two different output cotangents, so
one pass cannot serve both exactly.

The mask step moves the logits; they are restored (untimed) before every step so
that each repetition times the same state.

The paper's setting is 224x224 inputs; on a 2-core CPU that is too slow, so the
default is ``--input-size 3,64,64`` (``--input-size 3,224,224`` works).
Where the S2H step's time goes is read off the same timed steps; the backward is
split by timing the autograd calls ``pruner.backward`` makes (first: L + G_h into
weights and logits; then G_s into the logits; then R into the logits).

    python benchmarks/overhead.py --models resnet18,resnet50 --repeat 7
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

Row = dict[str, Any]


class _AutogradTimer:
    """Times torch.autograd.backward / torch.autograd.grad calls while active."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        orig_backward, orig_grad = torch.autograd.backward, torch.autograd.grad

        def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.calls.append((name, time.perf_counter() - t0))
            return timed

        torch.autograd.backward = wrap("backward", orig_backward)  # type: ignore[assignment]
        torch.autograd.grad = wrap("grad", orig_grad)  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.autograd.backward, torch.autograd.grad = orig_backward, orig_grad


BACKWARD_PARTS = ("bwd L+G_h", "bwd G_s", "bwd R")


def backward_parts(calls: list[tuple[str, float]]) -> dict[str, float]:
    """Name the autograd calls of one decoupled ``pruner.backward``."""
    if [n for n, _ in calls] == ["backward", "grad", "grad"]:
        return {k: s for k, (_, s) in zip(BACKWARD_PARTS, calls)}
    return {f"bwd call {i + 1} ({n})": s for i, (n, s) in enumerate(calls)}


def dense_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> dict[str, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return {"total": t3 - t0, "cpu": time.process_time() - c0, "fwd": t1 - t0,
            "bwd": t2 - t1, "opt": t3 - t2}


def s2h_step(pruner: Any, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             start: list[torch.Tensor] | None = None) -> dict[str, float]:
    """One timed S2H step; ``start``: mask logits to restore first (untimed), so
    every repetition runs at the same widths although ``mask_step`` moves them."""
    if start is not None:
        with torch.no_grad():
            for p, s in zip(pruner.mask_parameters(), start):
                p.copy_(s)
    timer = _AutogradTimer()
    c0, t0 = time.process_time(), time.perf_counter()
    pruner.sync_from_masks()  # pruner(x) in training mode = these three lines
    t1 = time.perf_counter()
    soft = pruner.soft_forward(x)
    t2 = time.perf_counter()
    hard = pruner.hard_forward(x)
    t3 = time.perf_counter()
    losses = pruner.losses((soft, hard), y)
    opt.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    with timer.active():
        pruner.backward(losses)
    t5 = time.perf_counter()
    opt.step()
    t6 = time.perf_counter()
    pruner.mask_step()
    t7 = time.perf_counter()
    parts = {"total": t7 - t0, "cpu": time.process_time() - c0, "sync": t1 - t0, "soft fwd": t2 - t1, "hard fwd": t3 - t2,
             "losses": t4 - t3, "backward": t5 - t4, "opt": t6 - t5, "mask step": t7 - t6}
    parts.update(backward_parts(timer.calls))
    return parts


def hard_step(pruner: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The hard branch alone at the pruner's current widths: forward, cross-entropy,
    backward into the weights (no optimiser): the part of an S2H step that scales
    with the budget."""
    weights = pruner.weight_parameters()
    c0, t0 = time.process_time(), time.perf_counter()
    loss = F.cross_entropy(pruner.hard_forward(x), y)
    torch.autograd.backward(loss, inputs=weights)
    t1 = time.perf_counter()
    for p in weights:
        p.grad = None
    return {"total": t1 - t0, "cpu": time.process_time() - c0}


def build(name: str, input_size: tuple[int, ...], batch: int, seed: int
          ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    if name == "toy":  # a small conv net, for tests
        model: nn.Module = nn.Sequential(
            nn.Conv2d(input_size[0], 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        classes = 10
    else:
        model = getattr(torchvision.models, name)(weights=None)
        classes = 1000
    x = torch.randn(batch, *input_size)
    y = torch.randint(0, classes, (batch,))
    return model.train(), x, y


def measure(name: str, args: argparse.Namespace) -> Row:
    import s2h_fx

    model, x, y = build(name, args.input_size, args.batch_size, args.seed)
    dense = copy.deepcopy(model).train()
    dense_opt = torch.optim.SGD(dense.parameters(), lr=1e-3, momentum=0.9)
    steps: dict[str, Callable[[], dict[str, float]]] = {
        "dense": lambda: dense_step(dense, dense_opt, x, y)}
    pruners = {}
    for state in args.states:
        pruner = s2h_fx.prune_graph(copy.deepcopy(model), args.budget,
                                    example_inputs=(x[:2],))
        if state == "full":
            for m in pruner.masks().values():
                m.reset_full_width()
        else:  # the masks at the budget's widths, fully confident
            pruner.set_widths(pruner.widths)
        pruner.train()
        opt = torch.optim.SGD(pruner.weight_parameters(), lr=1e-3, momentum=0.9)
        pruners[state] = pruner
        start = [t.detach().clone() for t in pruner.mask_parameters()]
        steps[f"s2h@{state}"] = (lambda p=pruner, o=opt, s=start: s2h_step(p, o, x, y, s))
        if state == "budget":
            hard = copy.deepcopy(pruner)  # the same widths, its own weights and grads
            steps["hard@budget"] = lambda h=hard: hard_step(h, x, y)
    names = list(steps)
    for _ in range(args.warmup):
        for n in names:
            steps[n]()
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for rep in range(args.repeat):
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            runs[n].append(steps[n]())
    dense_med = statistics.median(r["total"] for r in runs["dense"])
    dense_cpu = statistics.median(r["cpu"] for r in runs["dense"])
    row: Row = {
        "model": name, "input_size": list(args.input_size), "batch_size": args.batch_size,
        "budget": args.budget, "goal": 1 + args.budget + 0.3, "repeat": args.repeat,
        "warmup": args.warmup, "dense_s": dense_med, "dense_cpu_s": dense_cpu,
        "dense_parts": {k: statistics.median(r[k] for r in runs["dense"])
                        for k in runs["dense"][0]},
        "dense_runs": [r["total"] for r in runs["dense"]], "s2h": {},
    }
    if "hard@budget" in runs:
        row["hard_alone_s"] = statistics.median(r["total"] for r in runs["hard@budget"])
    for state in args.states:
        r = runs[f"s2h@{state}"]
        med = statistics.median(s["total"] for s in r)
        cpu = statistics.median(s["cpu"] for s in r)
        pruner = pruners[state]
        row["s2h"][state] = {
            "s2h_s": med, "ratio": med / dense_med,
            "ratio_per_rep_median": statistics.median(
                s["total"] / d["total"] for s, d in zip(r, runs["dense"])),
            "s2h_cpu_s": cpu, "ratio_cpu": cpu / dense_cpu,
            "hard_flops_ratio": float(pruner.flops_ratio(pruner.mask_widths())),
            "parts": {k: statistics.median(s.get(k, 0.0) for s in r) for k in r[0]},
            "runs": [s["total"] for s in r],
        }
        parts = row["s2h"][state]["parts"]
        if state == "budget" and "hard_alone_s" in row and "bwd G_s" in parts:
            # what this design cannot go below: the soft branch costs a dense step,
            # plus the hard branch's own forward+backward, plus the second pass
            # through the soft graph that G_s needs for the mask logits alone
            row["s2h"][state]["floor"] = 1 + (row["hard_alone_s"] + parts["bwd G_s"]) / dense_med
    return row


def report(row: Row) -> str:
    size = "x".join(str(s) for s in row["input_size"])
    lines = [f"{row['model']}: batch {row['batch_size']}, input {size}, budget "
             f"{row['budget']}, median of {row['repeat']}; dense step "
             f"{row['dense_s'] * 1e3:.0f} ms (fwd {row['dense_parts']['fwd'] * 1e3:.0f}, "
             f"bwd {row['dense_parts']['bwd'] * 1e3:.0f}, opt "
             f"{row['dense_parts']['opt'] * 1e3:.0f})"]
    for state, s in row["s2h"].items():
        verdict = "meets" if s["ratio"] <= row["goal"] else "misses"
        lines.append(f"  S2H step, hard branch at {state} width (hard FLOPs "
                     f"{s['hard_flops_ratio']:.3f}): {s['s2h_s'] * 1e3:.0f} ms, ratio "
                     f"{s['ratio']:.2f} (per-rep median {s['ratio_per_rep_median']:.2f}, "
                     f"process CPU time {s['ratio_cpu']:.2f}); goal "
                     f"<= {row['goal']:.2f}: {verdict}")
        parts = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in s["parts"].items()
                          if k not in ("total", "cpu"))
        lines.append(f"    where it goes (ms, medians): {parts}")
        if "floor" in s:
            lines.append(
                f"    floor of the exact decoupled step: 1 (soft = dense) + "
                f"{row['hard_alone_s'] / row['dense_s']:.2f} (hard branch alone, fwd+bwd) + "
                f"{s['parts']['bwd G_s'] / row['dense_s']:.2f} (G_s pass to the logits) = "
                f"{s['floor']:.2f}; the rest, {s['ratio'] - s['floor']:+.2f}, is mask "
                f"multiplies, weight slicing, importance/mask step and bookkeeping")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50",
                    help="comma-separated torchvision model names ('toy': a small conv net)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input-size", default="3,64,64",
                    help="C,H,W (the paper uses 3,224,224; too slow on 2 CPU cores)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--states", default="budget,full",
                    help="hard-branch width states to time: budget, full")
    ap.add_argument("--repeat", type=int, default=5, help="timed steps of each (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write JSON lines here")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.input_size = tuple(int(s) for s in args.input_size.split(","))
    args.states = [s for s in args.states.split(",") if s]
    if not set(args.states) <= {"budget", "full"} or not args.states:
        ap.error("--states takes budget and/or full")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    return args


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = "x".join(str(s) for s in args.input_size)
    note = " (the paper uses 224x224; smaller here for CPU time)" if size != "3x224x224" else ""
    print(f"S2H step / dense step, input {size}{note}, batch {args.batch_size}, "
          f"{args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}", flush=True)
    out = args.out.open("w") if args.out else None
    try:
        for name in args.models:
            load_start = _loadavg()
            row = measure(name, args)
            row["load_start"], row["load_end"] = load_start, _loadavg()
            row["threads"] = args.threads
            print(report(row), flush=True)
            print(f"  load average {row['load_start']} -> {row['load_end']}", flush=True)
            if out is not None:
                out.write(json.dumps(row) + "\n")
                out.flush()
    finally:
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

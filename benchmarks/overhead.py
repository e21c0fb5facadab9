"""Training-step overhead of S2H in the real loop: one S2H step over one dense step.

- dense step: ``forward + cross-entropy + backward + SGD step`` of the original model;
- S2H step: what ``fit()`` does per batch of the search phase: ``soft, hard =
  pruner(x)``, ``pruner.losses``, ``pruner.backward`` (decoupled), ``opt.step()``,
  ``pruner.mask_step()`` (which moves the masks and re-ranks the channels). The
  masks start at the budget's one-shot widths and are never restored: every
  step runs at the widths and kept channels the previous one left, as in
  ``fit`` (``--mask-lr`` sets how fast they move; the report counts the width
  changes seen in the timed steps).

The floor is what the exact decoupled step cannot go below, measured in the same
run and rotation: ``(soft step + hard branch alone + G_s pass) / dense``. The
soft step is the masked full-width network's forward + cross-entropy + backward
into weights and logits, plus an optimiser step (the dense one's time: same
shapes); it costs more than a dense step by the mask multiplies. The hard branch
alone is forward + cross-entropy + backward into the weights at the pruner's
current widths (weight slicing included); the G_s pass is a
second backward through the soft graph into the mask logits alone (the logits
need d(L + G_s)/du while the weights must get d(L)/dtheta from the same graph: two
different output cotangents, so one pass cannot serve both exactly). The
remainder, S2H step / dense - floor, is everything else: the kept positions'
indices, importance and re-ranking, the mask step, the resource loss and its
backward, the decoupled backward's bookkeeping, the statistics snapshot.

On the CPU the steps run with freed memory kept in the process, as ``fit`` runs
its epochs (:mod:`s2h_fx.heap`). ``--no-keep-heap``: glibc's default, which
between the kinds of step interleaved here returns the S2H step's freed
activations to the kernel every time, so that the next one faults them in again
(``fit``'s own loop settles after a few steps); the minor page faults of each
step are reported.

All of them are timed interleaved, the order rotated each repetition, after
``--warmup`` untimed rounds; medians. On CUDA (``--device cuda``: batch 128,
224x224 and autocast bfloat16 by default) every timed step is bracketed by
``torch.cuda.synchronize``. On CPU the paper's 224x224 is too slow for 2 cores:
the default is ``--input-size 3,64,64``, batch 32.

    python benchmarks/overhead.py --models resnet18,resnet50 --repeat 7
    python benchmarks/overhead.py --models resnet50 --device cuda
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
               y: torch.Tensor, ctx: Any) -> dict[str, float]:
    _sync(x.device)
    c0, t0 = time.process_time(), time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with ctx():
        loss = F.cross_entropy(model(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    _sync(x.device)
    t3 = time.perf_counter()
    return {"total": t3 - t0, "cpu": time.process_time() - c0, "fwd": t1 - t0,
            "bwd": t2 - t1, "opt": t3 - t2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _widths_key(pruner: Any) -> tuple[int, ...]:
    """The widths now (a batched read; called outside the timed steps)."""
    widths = pruner.widths
    return tuple(widths[g] for g in sorted(widths))


def s2h_step(pruner: Any, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             ctx: Any) -> dict[str, float]:
    """One timed S2H step as ``fit`` runs it: ``soft, hard = pruner(x)``, losses,
    the decoupled backward, the weights' step, the mask step (which moves the masks
    and re-ranks the channels: the next step runs at the widths it leaves)."""
    timer = _AutogradTimer()
    _sync(x.device)
    c0, t0 = time.process_time(), time.perf_counter()
    with ctx():
        soft, hard = pruner(x)
        t1 = time.perf_counter()
        losses = pruner.losses((soft, hard), y)
    opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    with timer.active():
        pruner.backward(losses)
    t3 = time.perf_counter()
    opt.step()
    t4 = time.perf_counter()
    pruner.mask_step()
    _sync(x.device)
    t5 = time.perf_counter()
    parts = {"total": t5 - t0, "cpu": time.process_time() - c0, "forward": t1 - t0,
             "losses": t2 - t1, "backward": t3 - t2, "opt": t4 - t3, "mask step": t5 - t4}
    parts.update(backward_parts(timer.calls))
    return parts


def gs_pass(pruner: Any, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> dict[str, float]:
    """The G_s pass alone: a second backward through the soft graph into the mask
    logits (what the decoupled backward adds to a soft step), timed by itself."""
    with ctx():
        soft = pruner.soft_forward(x)
        hard = soft.detach() + 0.1  # any fixed target: G_s's cost is the backward
        loss = F.kl_div(F.log_softmax(soft.float(), -1), F.log_softmax(hard.float(), -1),
                        log_target=True, reduction="batchmean")
    _sync(x.device)
    c0, t0 = time.process_time(), time.perf_counter()
    torch.autograd.grad(loss, pruner.mask_parameters(), allow_unused=True)
    _sync(x.device)
    return {"total": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def soft_step(pruner: Any, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> dict[str, float]:
    """The soft branch alone: the masked full-width network's forward, cross-entropy,
    backward into the weights and the mask logits (no optimiser; the dense step's
    optimiser time is added to it in the floor)."""
    params = pruner.weight_parameters() + pruner.mask_parameters()
    _sync(x.device)
    c0, t0 = time.process_time(), time.perf_counter()
    with ctx():
        loss = F.cross_entropy(pruner.soft_forward(x), y)
    torch.autograd.backward(loss, inputs=params)
    _sync(x.device)
    t1 = time.perf_counter()
    for p in params:
        p.grad = None
    return {"total": t1 - t0, "cpu": time.process_time() - c0}


def hard_step(pruner: Any, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> dict[str, float]:
    """The hard branch alone at the pruner's current widths: forward, cross-entropy,
    backward into the weights (no optimiser): the part of an S2H step that scales
    with the budget."""
    weights = pruner.weight_parameters()
    _sync(x.device)
    c0, t0 = time.process_time(), time.perf_counter()
    with ctx():
        loss = F.cross_entropy(pruner.hard_forward(x), y)
    torch.autograd.backward(loss, inputs=weights)
    _sync(x.device)
    t1 = time.perf_counter()
    for p in weights:
        p.grad = None
    return {"total": t1 - t0, "cpu": time.process_time() - c0}


def make_model(name: str, channels: int) -> tuple[nn.Module, int]:
    """torchvision's ``name`` with random weights (1000 classes), or ``"toy"``: a small
    conv net (10 classes), for tests."""
    if name == "toy":
        return nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), 10
    return getattr(torchvision.models, name)(weights=None), 1000


def build(name: str, input_size: tuple[int, ...], batch: int, seed: int
          ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model, classes = make_model(name, input_size[0])
    x = torch.randn(batch, *input_size)
    y = torch.randint(0, classes, (batch,))
    return model.train(), x, y


def measure(name: str, args: argparse.Namespace) -> Row:
    import s2h_fx
    from s2h_fx.config import S2HConfig
    from s2h_fx.heap import kept_heap

    dev = torch.device(args.device)
    model, x, y = build(name, args.input_size, args.batch_size, args.seed)
    config = S2HConfig(mask_lr=args.mask_lr)
    pruner = s2h_fx.prune_graph(copy.deepcopy(model), args.budget, example_inputs=(x[:2],),
                                config=config)
    with torch.no_grad():  # the one-shot widths, held with fit-like (not full) confidence
        for p in pruner.mask_parameters():
            p.mul_(args.confidence)
    x, y = x.to(dev), y.to(dev)
    dense = copy.deepcopy(model).to(dev).train()
    pruner.to(dev).train()
    dense_opt = torch.optim.SGD(dense.parameters(), lr=1e-3, momentum=0.9)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=1e-3, momentum=0.9)
    amp = args.amp and dev.type == "cuda"

    def ctx() -> Any:
        return (torch.autocast("cuda", dtype=torch.bfloat16) if amp
                else contextlib.nullcontext())

    # the masks move from the budget's one-shot widths as in fit (mask step and
    # re-ranking every step, never restored); the hard branch alone and the G_s
    # pass run at whatever widths the masks have at that moment
    steps: dict[str, Callable[[], dict[str, float]]] = {
        "dense": lambda: dense_step(dense, dense_opt, x, y, ctx),
        "s2h": lambda: s2h_step(pruner, opt, x, y, ctx),
        "soft alone": lambda: soft_step(pruner, x, y, ctx),
        "hard alone": lambda: hard_step(pruner, x, y, ctx),
        "G_s pass": lambda: gs_pass(pruner, x, y, ctx),
    }
    names = list(steps)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    seen = [_widths_key(pruner)]
    # fit keeps freed memory in the process on the CPU while an epoch runs; so does
    # this (--no-keep-heap: as glibc does by default), for every kind of step alike
    with kept_heap(args.keep_heap and dev.type == "cpu") as heap_kept:
        for _ in range(args.warmup):
            for n in names:
                steps[n]()
        for rep in range(args.repeat):
            k = rep % len(names)
            for n in names[k:] + names[:k]:
                faults = _minor_faults()
                runs[n].append(steps[n]())
                runs[n][-1]["faults"] = _minor_faults() - faults
            key = _widths_key(pruner)
            if key != seen[-1]:
                seen.append(key)
    med = {n: statistics.median(r["total"] for r in runs[n]) for n in names}
    cpu = {n: statistics.median(r["cpu"] for r in runs[n]) for n in names}
    dense_s = med["dense"]
    opt_s = statistics.median(r["opt"] for r in runs["dense"])
    # the soft step: the soft branch alone plus an optimiser step (the dense one's)
    soft_s, soft_cpu = med["soft alone"] + opt_s, cpu["soft alone"] + opt_s
    floor = (soft_s + med["hard alone"] + med["G_s pass"]) / dense_s
    ratio = med["s2h"] / dense_s
    floor_cpu = (soft_cpu + cpu["hard alone"] + cpu["G_s pass"]) / cpu["dense"]
    ratio_cpu = cpu["s2h"] / cpu["dense"]
    state = pruner.state
    return {
        "model": name, "device": str(dev), "amp": amp, "input_size": list(args.input_size),
        "batch_size": args.batch_size, "budget": args.budget, "mask_lr": args.mask_lr,
        "repeat": args.repeat, "warmup": args.warmup, "dense_s": dense_s,
        "s2h_s": med["s2h"], "soft_step_s": soft_s, "hard_alone_s": med["hard alone"],
        "gs_pass_s": med["G_s pass"],
        "ratio": ratio, "floor": floor, "remainder": ratio - floor,
        "cpu_s": cpu, "ratio_cpu": ratio_cpu, "floor_cpu": floor_cpu,
        "remainder_cpu": ratio_cpu - floor_cpu,
        "ratio_per_rep_median": statistics.median(
            s["total"] / d["total"] for s, d in zip(runs["s2h"], runs["dense"])),
        "dense_parts": {k: statistics.median(r[k] for r in runs["dense"])
                        for k in runs["dense"][0]},
        "s2h_parts": {k: statistics.median(s.get(k, 0.0) for s in runs["s2h"])
                      for k in runs["s2h"][0] if k != "faults"},
        "heap_kept": heap_kept,
        "page_faults": {n: statistics.median(r["faults"] for r in runs[n]) for n in names},
        "hard_flops_ratio": float(pruner.flops_ratio()),
        "width_changes": len(seen) - 1,
        "plan_builds": getattr(state, "plan_builds", None),
        "skeleton_builds": getattr(state, "skeleton_builds", None),
        "runs": {n: [r["total"] for r in runs[n]] for n in names},
    }


def report(row: Row) -> str:
    size = "x".join(str(s) for s in row["input_size"])
    d = row["dense_s"]
    lines = [f"{row['model']} on {row['device']}{' (AMP bf16)' if row['amp'] else ''}: batch "
             f"{row['batch_size']}, input {size}, budget {row['budget']}, median of "
             f"{row['repeat']}; dense step {d * 1e3:.1f} ms",
             f"  S2H step {row['s2h_s'] * 1e3:.1f} ms = {row['ratio']:.2f} dense steps "
             f"(per-rep median {row['ratio_per_rep_median']:.2f}); the masks moved: "
             f"{row['width_changes']} width changes in the timed steps, hard FLOPs now "
             f"{row['hard_flops_ratio']:.3f}",
             f"  floor = {row['soft_step_s'] / d:.2f} (soft step: masked network, fwd+bwd+opt) "
             f"+ {row['hard_alone_s'] / d:.2f} (hard branch alone) + "
             f"{row['gs_pass_s'] / d:.2f} (G_s pass) = {row['floor']:.2f}; "
             f"remainder {row['remainder']:+.3f} of a dense step",
             f"  process CPU time: ratio {row['ratio_cpu']:.2f}, floor {row['floor_cpu']:.2f}, "
             f"remainder {row['remainder_cpu']:+.3f} (less sensitive to a loaded machine)"]
    parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row["s2h_parts"].items()
                      if k not in ("total", "cpu"))
    lines.append(f"  where the S2H step goes (ms, medians): {parts}")
    faults = ", ".join(f"{k} {v:g}" for k, v in row["page_faults"].items())
    lines.append(f"  minor page faults per step (medians): {faults}; freed memory kept in "
                 f"the process: {'yes' if row['heap_kept'] else 'no'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50",
                    help="comma-separated torchvision model names ('toy': a small conv net)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default 32 on CPU, 128 on CUDA")
    ap.add_argument("--input-size", default=None,
                    help="C,H,W; default 3,64,64 on CPU (224x224 is too slow on 2 cores), "
                         "3,224,224 on CUDA")
    ap.add_argument("--no-amp", dest="amp", action="store_false",
                    help="on CUDA: float32 instead of autocast bfloat16")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--mask-lr", type=float, default=0.05,
                    help="S2HConfig.mask_lr: the masks' step size (they move every step)")
    ap.add_argument("--confidence", type=float, default=0.1,
                    help="the one-shot logits are scaled by this (1: full confidence, the "
                         "widths hardly move; fit starts from soft logits)")
    ap.add_argument("--repeat", type=int, default=7, help="timed steps of each (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    ap.add_argument("--no-keep-heap", dest="keep_heap", action="store_false",
                    help="on CPU: let glibc return freed memory to the kernel during the "
                         "steps (its default; fit keeps it: s2h_fx.heap)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write JSON lines here")
    args = ap.parse_args(argv)
    device_defaults(ap, args)
    args.models = [m for m in args.models.split(",") if m]
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    return args


def device_defaults(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check --device and fill --batch-size and --input-size by it: 128 and
    3x224x224 on CUDA, 32 and 3x64x64 on CPU (224x224 is too slow on 2 cores)."""
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda, but CUDA is not available")
    args.batch_size = args.batch_size or (128 if cuda else 32)
    args.input_size = tuple(int(s) for s in (args.input_size or (
        "3,224,224" if cuda else "3,64,64")).split(","))


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    import s2h_fx

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = "x".join(str(s) for s in args.input_size)
    note = " (the paper uses 224x224; smaller here for CPU time)" if size != "3x224x224" else ""
    print(f"S2H step / dense step on {args.device}, input {size}{note}, batch {args.batch_size}, "
          f"{args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, s2h_fx from "
          f"{Path(s2h_fx.__file__).parent}", flush=True)
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

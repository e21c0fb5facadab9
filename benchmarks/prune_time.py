"""Time to prune: s2h-fx against Torch-Pruning on one model, in the same run.

- s2h-fx: ``prune_graph`` + ``export``.
- Torch-Pruning: ``MetaPruner`` (its DependencyGraph build) + ``step()``, at the
  ``pruning_ratio`` that matches s2h-fx's measured FLOPs ratio. The ratio is
  found by bisection first (untimed); only the final trial is timed.

One untimed warm-up of each, then ``--repeat`` runs of each, interleaved;
the medians are reported.

    python benchmarks/prune_time.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import bisect_tp, build, count_flops, find_classifier, tp_trial  # noqa: E402


def time_s2h(model: torch.nn.Module, x: torch.Tensor, budget: float) -> tuple[float, Any]:
    import s2h_fx

    t0 = time.perf_counter()
    pruner = s2h_fx.prune_graph(model, budget=budget, example_inputs=(x,))
    pruned = pruner.export()
    return time.perf_counter() - t0, pruned


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x = build(args.model, args.input_size, args.seed)
    dense_flops, _ = count_flops(model, x)

    _, pruned = time_s2h(model, x, args.budget)  # also the warm-up
    target = count_flops(pruned, x)[0] / dense_flops
    classifier = find_classifier(model, x)

    def trial(ratio: float) -> tuple[float, None]:
        tp_model, _ = tp_trial(model, x, ratio, classifier)
        return count_flops(tp_model, x)[0] / dense_flops, None

    ratio, (tp_flops_ratio, _) = bisect_tp(trial, target)
    tp_trial(model, x, ratio, classifier)  # warm-up

    # interleaved, so that a change in machine load hits both sides alike
    s2h_runs, tp_runs = [], []
    for _ in range(args.repeat):
        s2h_runs.append(time_s2h(model, x, args.budget)[0])
        tp_runs.append(tp_trial(model, x, ratio, classifier)[1])

    s2h_s, tp_s = statistics.median(s2h_runs), statistics.median(tp_runs)
    return {
        "model": args.model, "input_size": list(args.input_size), "budget": args.budget,
        "repeat": args.repeat, "threads": torch.get_num_threads(),
        "load_avg_1min": _load(),
        "s2h_flops_ratio": target, "s2h_median_s": s2h_s, "s2h_runs_s": s2h_runs,
        "tp_pruning_ratio": ratio, "tp_flops_ratio": tp_flops_ratio,
        "tp_median_s": tp_s, "tp_runs_s": tp_runs, "s2h_over_tp": s2h_s / tp_s,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "torch_pruning": _tp_version(), "python": platform.python_version(),
    }


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _tp_version() -> str:
    import torch_pruning as tp

    return tp.__version__


def format_report(r: dict[str, Any]) -> str:
    size = "x".join(map(str, r["input_size"][1:]))
    load = r["load_avg_1min"]
    head = (f"{r['model']} at {size}, budget {r['budget']:g}, median of {r['repeat']}, "
            f"{r['threads']} threads" + ("" if load is None else f", load average {load:.1f}"))
    rows = [
        ("s2h-fx prune_graph + export", r["s2h_median_s"], r["s2h_flops_ratio"]),
        ("Torch-Pruning DependencyGraph + prune", r["tp_median_s"], r["tp_flops_ratio"]),
    ]
    lines = [head, f"{'':40s} {'median s':>9s} {'FLOPs ratio':>12s}"]
    lines += [f"{name:40s} {s:9.3f} {f:12.3f}" for name, s, f in rows]
    lines.append(f"ratio s2h-fx / Torch-Pruning: {r['s2h_over_tp']:.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--input-size", type=lambda s: tuple(int(v) for v in s.split(",")),
                   default=(3, 224, 224))
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="append a JSON line here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print(format_report(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

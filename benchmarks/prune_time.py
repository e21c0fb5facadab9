"""Time to prune: s2h-fx against Torch-Pruning, model by model, in the same run.

- s2h-fx: ``prune_graph`` + ``export`` (the user's model is left as it was).
- Torch-Pruning: ``MetaPruner`` (its DependencyGraph build) + ``step()``, at the
  ``pruning_ratio`` that matches s2h-fx's measured FLOPs ratio, found by bisection
  first (untimed). Torch-Pruning prunes the model in place, so it is timed twice:
  on a copy made before the clock starts (``tp``, its own cost) and with that
  ``copy.deepcopy`` inside the clock (``tp+copy``: the same contract as s2h-fx,
  whose time includes its own copy). Where Torch-Pruning's default API emits a
  model that does not run (ViTs whose attention reshapes by head count), no FLOPs
  can be matched: it is timed at ``pruning_ratio = 1 - sqrt(flops ratio)`` (a
  uniform channel ratio with those FLOPs) and the table says so.

One untimed warm-up of each, then ``--repeat`` rounds, each timing both in
turn, so a change of machine load hits both alike; medians are reported.

    python benchmarks/prune_time.py --threads 1 --repeat 3
    python benchmarks/prune_time.py --models resnet50,timm:beitv2_base_patch16_224

``timm:NAME`` needs timm (``pip install -e '.[timm]'``); torchvision names need nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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
import warnings  # noqa: E402

from zoo import bisect_tp, count_flops, find_classifier, short_error, tp_trial  # noqa: E402

# Torch-Pruning warns about every bare parameter (class tokens, relative-position tables)
warnings.filterwarnings("ignore", message="Unwrapped parameters detected")

DEFAULT_MODELS = "resnet50,vit_b_16,timm:beitv2_base_patch16_224"


def build(name: str, input_size: tuple[int, ...], seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A torchvision model by name, or ``timm:NAME`` (random weights, eval mode)."""
    torch.manual_seed(seed)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as exc:
            raise SystemExit(f"{name} needs timm: pip install -e '.[timm]'") from exc
        model = timm.create_model(name[5:], pretrained=False)
    else:
        model = torchvision.models.get_model(name, weights=None)
    return model.eval(), torch.randn(1, *input_size)


def time_s2h(model: torch.nn.Module, x: torch.Tensor, budget: float) -> tuple[float, Any]:
    import s2h_fx

    t0 = time.perf_counter()
    pruner = s2h_fx.prune_graph(model, budget=budget, example_inputs=(x,))
    pruned = pruner.export()
    return time.perf_counter() - t0, pruned


def time_tp_copy(model: torch.nn.Module, x: torch.Tensor, ratio: float,
                 classifier: str | None) -> float:
    """Torch-Pruning with the copy of the user's model inside the clock."""
    t0 = time.perf_counter()
    tp_trial(copy.deepcopy(model), x, ratio, classifier, copy_model=False)
    return time.perf_counter() - t0


def match_tp(model: torch.nn.Module, x: torch.Tensor, target: float, dense_flops: float,
             classifier: str | None) -> dict[str, Any]:
    """Torch-Pruning's pruning_ratio at s2h-fx's FLOPs ratio, or the fallback."""
    def trial(ratio: float) -> tuple[float, None]:
        tp_model, _ = tp_trial(model, x, ratio, classifier)
        return count_flops(tp_model, x)[0] / dense_flops, None

    try:
        ratio, (tp_flops_ratio, _) = bisect_tp(trial, target)
        return {"tp_pruning_ratio": ratio, "tp_flops_ratio": tp_flops_ratio, "tp_runs": True,
                "tp_error": None}
    except Exception as exc:  # its pruned model does not run: time it at a uniform ratio
        return {"tp_pruning_ratio": 1.0 - math.sqrt(target), "tp_flops_ratio": None,
                "tp_runs": False, "tp_error": short_error(exc)}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, x = build(name, args.input_size, args.seed)
    dense_flops, _ = count_flops(model, x)

    _, pruned = time_s2h(model, x, args.budget)  # also the warm-up
    target = count_flops(pruned, x)[0] / dense_flops
    del pruned
    classifier = find_classifier(model, x)
    row = {"model": name, "input_size": list(args.input_size), "budget": args.budget,
           "s2h_flops_ratio": target, "tp_ignored": classifier}
    row.update(match_tp(model, x, target, dense_flops, classifier))
    ratio = row["tp_pruning_ratio"]
    tp_trial(model, x, ratio, classifier)  # warm-up

    s2h_runs: list[float] = []
    tp_runs: list[float] = []
    tp_copy_runs: list[float] = []
    for _ in range(args.repeat):
        s2h_runs.append(time_s2h(model, x, args.budget)[0])
        tp_runs.append(tp_trial(model, x, ratio, classifier)[1])
        tp_copy_runs.append(time_tp_copy(model, x, ratio, classifier))
    row.update({
        "s2h_median_s": statistics.median(s2h_runs), "s2h_runs_s": s2h_runs,
        "tp_median_s": statistics.median(tp_runs), "tp_runs_s": tp_runs,
        "tp_copy_median_s": statistics.median(tp_copy_runs), "tp_copy_runs_s": tp_copy_runs,
    })
    row["s2h_over_tp"] = row["s2h_median_s"] / row["tp_median_s"]
    row["s2h_over_tp_copy"] = row["s2h_median_s"] / row["tp_copy_median_s"]
    return row


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch_pruning as tp

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"repeat": args.repeat, "threads": torch.get_num_threads(), "load_avg_1min": load,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_pruning": tp.__version__, "python": platform.python_version()}


def format_table(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    load = env["load_avg_1min"]
    head = (f"prune_graph + export (s2h-fx) against Torch-Pruning's graph build + prune, "
            f"median of {env['repeat']}, {env['threads']} thread(s)"
            + ("" if load is None else f", load average {load:.1f} at the end"))
    cols = (f"{'model':34s} {'s2h-fx s':>9s} {'tp s':>7s} {'tp+copy s':>10s} "
            f"{'s2h/tp':>7s} {'s2h/tp+copy':>12s} {'FLOPs s2h':>10s} {'FLOPs tp':>9s}")
    lines = [head, cols]
    for r in rows:
        tp_flops = f"{r['tp_flops_ratio']:.3f}" if r["tp_runs"] else "no run*"
        lines.append(f"{r['model']:34s} {r['s2h_median_s']:9.3f} {r['tp_median_s']:7.3f} "
                     f"{r['tp_copy_median_s']:10.3f} {r['s2h_over_tp']:6.2f}x "
                     f"{r['s2h_over_tp_copy']:11.2f}x {r['s2h_flops_ratio']:10.3f} {tp_flops:>9s}")
    for r in rows:
        if not r["tp_runs"]:
            lines.append(f"* {r['model']}: Torch-Pruning's pruned model does not run "
                         f"({r['tp_error']}); timed at pruning_ratio "
                         f"{r['tp_pruning_ratio']:.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma-separated torchvision names or timm:NAME")
    p.add_argument("--input-size", type=lambda s: tuple(int(v) for v in s.split(",")),
                   default=(3, 224, 224))
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="append a JSON line per model here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        print(f"{name} ...", flush=True)
        row = measure(name, args)
        rows.append(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**row, **environment(args)}) + "\n")
    print(format_table(rows, environment(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

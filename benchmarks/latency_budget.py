"""A latency budget, measured: the latency model's accuracy, and pruning to a latency budget.

Two studies (issue 10), each printing a table and appending JSON lines to ``--out``:

* ``accuracy``: for ``--settings`` random width settings of each model, the latency
  model's prediction against the measured whole-network latency on ``--runtime``
  (relative error; summary: median and p90 of |error|, share within 10%).
* ``budget``: each model pruned to ``--budget`` of its measured latency (one-shot
  widths; with ``--train`` also after S2H training), next to the FLOPs-budget
  network of the same measured latency and Torch-Pruning at that latency (both
  found by bisection on measured latency), all timed together in interleaved
  rounds: measured latency ratio, FLOPs ratio, params ratio, and accuracy (with
  ``--train``: digits or Fashion-MNIST, dense model trained first, the same
  epochs of S2H for both s2h-fx networks and of fine-tuning for Torch-Pruning).

    python benchmarks/latency_budget.py accuracy --models resnet50,mobilenet_v2 \\
        --runtime onnxruntime --settings 20 --out latency_accuracy.jsonl
    python benchmarks/latency_budget.py budget --models resnet50,mobilenet_v2,efficientnet_b0 \\
        --runtime onnxruntime --budget 0.5 --out latency_budget.jsonl
    python benchmarks/latency_budget.py budget --models resnet18 --train digits --epochs 10 \\
        --input-size 3,32,32 --runtime onnxruntime --out latency_budget_digits.jsonl

Layer tables are cached (``--cache-dir``, default ``~/.cache/s2h-fx``): a second run
on the same runtime, batch, threads and versions measures only the networks.
Measure on an idle machine: every row records the load average and threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import s2h_fx
from s2h_fx.cost import count_parameters
from s2h_fx.deploy import check, deploy
from s2h_fx.latency import RuntimeMeasure
from s2h_fx.measure import count_flops
from s2h_fx.timing import environment, time_interleaved

MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0"]


def _csv(kind: type) -> Any:
    return lambda text: [kind(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("study", choices=("accuracy", "budget"))
    p.add_argument("--models", type=_csv(str), default=MODELS)
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--input-size", type=_csv(int), default=[3, 224, 224])
    p.add_argument("--divisor", type=int, default=8)
    p.add_argument("--points", type=int, default=4, help="grid points per axis of a table")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--settings", type=int, default=20, help="accuracy: random width settings")
    p.add_argument("--budget", type=float, default=0.5, help="budget: the latency fraction")
    p.add_argument("--match-trials", type=int, default=6,
                   help="budget: bisection steps to match the latency-budget network's latency")
    p.add_argument("--no-tp", dest="tp", action="store_false", help="leave Torch-Pruning out")
    p.add_argument("--train", choices=("digits", "fashion-mnist"), default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("latency_budget.jsonl"))
    return p.parse_args(argv)


# ---- shared ---------------------------------------------------------------------
def _model(name: str, classes: int = 1000) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=classes).eval()


def _latency_budget(args: argparse.Namespace, fraction: float) -> dict[str, Any]:
    budget: dict[str, Any] = {"latency": fraction, "runtime": args.runtime,
                              "batch": args.batch, "device": args.device,
                              "points": args.points}
    if args.threads:
        budget["threads"] = args.threads
    if args.cache_dir:
        budget["cache_dir"] = args.cache_dir
    return budget


def _measure(args: argparse.Namespace) -> RuntimeMeasure:
    return RuntimeMeasure(args.runtime, args.device, args.batch, args.threads, args.rounds,
                          args.warmup)


def _time_all(args: argparse.Namespace, nets: dict[str, nn.Module],
              x: torch.Tensor) -> dict[str, float]:
    """Median seconds of every network, deployed, checked and timed in interleaved rounds."""
    runs = {}
    for name, net in nets.items():
        d = deploy(net, x, args.runtime, device=args.device, threads=args.threads)
        check(d, net, x)
        runs[name] = d.run
    timings = time_interleaved(runs, x.shape[0], rounds=args.rounds, warmup=args.warmup,
                               device=args.device)
    return {name: t.median_ms / 1e3 for name, t in timings.items()}


def _write(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")


# ---- accuracy of the latency model ----------------------------------------------------
def random_widths(pruner: Any, rng: np.random.Generator) -> dict[int, int]:
    """A width setting: a global keep fraction in [0.3, 1], each group near it."""
    keep = rng.uniform(0.3, 1.0)
    widths = {}
    for g in pruner.grouping.prunable:
        w = keep * g.size * rng.uniform(0.7, 1.3)
        widths[g.index] = int(np.clip(round(w / g.divisor) * g.divisor, g.divisor, g.size))
    return widths


def accuracy_study(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    """Predicted against measured latency of random width settings. Each setting is
    timed in interleaved rounds with the dense network, so the measured *ratio* (what
    a latency budget is a fraction of) is free of the machine's drift over the run;
    the absolute figures are reported too."""
    torch.manual_seed(args.seed)
    model = _model(name)
    x = torch.randn(args.batch, *args.input_size)
    start = time.perf_counter()
    pruner = s2h_fx.prune_graph(model, _latency_budget(args, 1.0), (x,), divisor=args.divisor)
    build_s = time.perf_counter() - start
    latency = pruner.cost_model
    dense_net = pruner.export(enforce_budget=False)  # full widths: the traced dense network
    rng = np.random.default_rng(args.seed)
    rows = []
    for i in range(args.settings):
        widths = random_widths(pruner, rng)
        pruner.set_widths(widths)
        net = pruner.export(enforce_budget=False)
        seconds = _time_all(args, {"dense": dense_net, "pruned": net}, x)
        predicted = float(latency(widths))
        ratio_pred, ratio_meas = predicted / latency.total, seconds["pruned"] / seconds["dense"]
        rows.append({"study": "accuracy", "model": name, "setting": i, "runtime": args.runtime,
                     "batch": args.batch, "threads": args.threads,
                     "predicted_s": predicted, "measured_s": seconds["pruned"],
                     "rel_error": predicted / seconds["pruned"] - 1,
                     "dense_measured_s": seconds["dense"], "dense_model_s": latency.total,
                     "predicted_ratio": ratio_pred, "measured_ratio": ratio_meas,
                     "ratio_error": ratio_pred / ratio_meas - 1, "table_build_s": build_s,
                     "calibration": {"constant_s": latency.constant, "scale": latency.scale,
                                     "points": latency.calibration},
                     "flops_ratio": float(pruner.flops_ratio())})
    return rows


def accuracy_summary(rows: list[dict[str, Any]], key: str = "ratio_error") -> dict[str, float]:
    err = np.abs([r[key] for r in rows])
    return {"median_abs_error": float(np.median(err)), "p90_abs_error": float(np.percentile(err, 90)),
            "within_10pct": float(np.mean(err <= 0.10))}


# ---- pruning to a latency budget -------------------------------------------------------
def bisect(trial: Callable[[float], tuple[float, Any]], target: float, lo: float, hi: float,
           trials: int, rising: bool = True) -> tuple[float, float, Any]:
    """The argument in [lo, hi] whose ``trial(arg)[0]`` is closest to ``target`` after
    ``trials`` bisection steps (``rising``: the figure grows with the argument)."""
    best: tuple[float, float, float, Any] | None = None
    for _ in range(max(1, trials)):
        mid = (lo + hi) / 2
        value, result = trial(mid)
        if best is None or abs(value - target) < best[0]:
            best = (abs(value - target), mid, value, result)
        if (value > target) == rising:
            hi = mid
        else:
            lo = mid
    assert best is not None
    return best[1], best[2], best[3]


def _prune_budget(model: nn.Module, budget: Any, x: torch.Tensor, args: argparse.Namespace,
                  loaders: Any) -> Any:
    pruner = s2h_fx.prune_graph(copy.deepcopy(model), budget, (x[:1],), divisor=args.divisor)
    if loaders is not None:
        pruner.fit(loaders[0], args.epochs, progress=False)
    return pruner


def _networks(args: argparse.Namespace, model: nn.Module, x: torch.Tensor,
              loaders: Any) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The dense network, s2h-fx at the latency budget (S2H trained where ``loaders``
    are given), and the FLOPs-budget s2h-fx and Torch-Pruning networks bisected on
    one-shot widths to its measured latency ratio, then trained as long (S2H at the
    matched FLOPs budget; Torch-Pruning fine-tuned). Every ratio is timed interleaved
    with the dense network (the machine drifts over a run)."""
    measure = _measure(args)

    def ratio(net: nn.Module) -> float:
        s = measure.networks({"dense": model, "net": net}, x)
        return s["net"] / s["dense"]

    nets: dict[str, nn.Module] = {"dense": model}
    # trained (where loaders are given) before the others are matched to it: S2H moves
    # the widths, so the latency to match is the trained network's
    lat = _prune_budget(model, _latency_budget(args, args.budget), x, args, loaders)
    nets["s2h-latency"] = lat.export()
    target = ratio(nets["s2h-latency"])
    info: dict[str, Any] = {"predicted_ratio": float(lat.cost_ratio()),
                            "target_ratio": target,
                            "matched_to": "trained" if loaders is not None else "one-shot",
                            "calibration": {"constant_s": lat.cost_model.constant,
                                            "scale": lat.cost_model.scale},
                            # (predicted, measured) ratio of each network prune_graph timed
                            "landings": [list(t) for t in lat.cost_model.landings]}

    def flops_trial(b: float) -> tuple[float, Any]:
        net = _prune_budget(model, b, x, args, None).export()
        return ratio(net), net

    b, _, nets["s2h-flops"] = bisect(flops_trial, target, 0.05, 1.0, args.match_trials)
    info["flops_budget_matched"] = b
    if args.tp:
        from s2h_fx.tp_match import find_classifier, prune_tp

        head = find_classifier(model, x[:1])

        def tp_trial(r: float) -> tuple[float, Any]:
            net = prune_tp(model, x[:1], r, round_to=args.divisor, classifier=head)
            return ratio(net), net

        r, _, nets["torch-pruning"] = bisect(tp_trial, target, 0.0, 0.95, args.match_trials,
                                             rising=False)
        info["tp_ratio_matched"] = r
    if loaders is not None:  # S2H at the matched FLOPs budget, TP fine-tuned as long
        nets["s2h-flops"] = _prune_budget(model, b, x, args, loaders).export()
        if "torch-pruning" in nets:
            from s2h_fx.demo import train_dense

            train_dense(nets["torch-pruning"], loaders[0], args.epochs)
    return nets, info


def _loaders(args: argparse.Namespace) -> Any:
    if args.train is None:
        return None
    from s2h_fx.data import digits_loaders, fashion_mnist_loaders

    if args.train == "digits":
        return digits_loaders(size=args.input_size[-1], seed=args.seed)
    return fashion_mnist_loaders(size=args.input_size[-1], seed=args.seed, channels=3)


def budget_study(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    from s2h_fx.demo import accuracy, train_dense

    torch.manual_seed(args.seed)
    loaders = _loaders(args)
    model = _model(name, 10 if loaders is not None else 1000)
    if loaders is not None:
        train_dense(model, loaders[0], args.epochs)
    model.eval()
    x = torch.randn(args.batch, *args.input_size)
    nets, info = _networks(args, model, x, loaders)
    seconds = _time_all(args, nets, x)
    flops = {n: float(count_flops(net, x[:1])) for n, net in nets.items()}
    rows = []
    for n, net in nets.items():
        rows.append({"study": "budget", "model": name, "network": n, "runtime": args.runtime,
                     "batch": args.batch, "budget": args.budget, "median_s": seconds[n],
                     "latency_ratio": seconds[n] / seconds["dense"],
                     "flops_ratio": flops[n] / flops["dense"],
                     "params_ratio": count_parameters(net) / count_parameters(model),
                     "accuracy": accuracy(net, loaders[1]) if loaders is not None else None,
                     **info})
    return rows


# ---- main ---------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]]) -> str:
    if rows and rows[0]["study"] == "accuracy":
        out = []
        for key, what in (("ratio_error", "latency ratio (interleaved with dense)"),
                          ("rel_error", "absolute latency")):
            s = accuracy_summary(rows, key)
            out.append(f"{rows[0]['model']}: {len(rows)} settings, {what}: |error| median "
                       f"{s['median_abs_error']:.3f}, p90 {s['p90_abs_error']:.3f}, "
                       f"within 10%: {s['within_10pct']:.2f}")
        return "\n".join(out)
    lines = [f"{'model':16}{'network':15}{'latency':>9}{'FLOPs':>8}{'params':>8}{'acc':>7}"]
    for r in rows:
        acc = f"{r['accuracy']:7.3f}" if r["accuracy"] is not None else f"{'-':>7}"
        lines.append(f"{r['model']:16}{r['network']:15}{r['latency_ratio']:9.3f}"
                     f"{r['flops_ratio']:8.3f}{r['params_ratio']:8.3f}{acc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    study = accuracy_study if args.study == "accuracy" else budget_study
    for name in args.models:
        try:
            rows = study(args, name)
        except s2h_fx.BudgetError as exc:  # out of reach as measured: say so, go on
            _write(args.out, {"study": args.study, "model": name, "runtime": args.runtime,
                              "batch": args.batch, "budget": args.budget,
                              "error": f"{type(exc).__name__}: {exc}", "env": env})
            print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        for row in rows:
            _write(args.out, {**row, "env": env})
        print(_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency of s2h-fx and Torch-Pruning networks at the same FLOPs, on every runtime here.

For each model and budget, one ``s2h-fx bench`` in its own process (a crash or a
hang costs one model, not the run): dense, s2h-fx (one-shot widths at the
budget) and Torch-Pruning (bisected to the same FLOPs, ``round_to`` = divisor;
where it misses them by more than 5 %, also s2h-fx at its FLOPs, ``s2h-fx@tp``),
deployed on each runtime, checked against the eager network, timed in
interleaved rounds at each batch size. Rows are appended to ``--out`` as JSON
lines as soon as each (runtime, batch) is done; ``--resume`` skips what is
already there. ``--table`` prints the efficiency table from the file.

    python benchmarks/latency.py --out latency.jsonl                  # the full grid
    python benchmarks/latency.py --models resnet50 --budgets 0.5 --batches 32 \\
        --runtimes onnxruntime --divisors 8,16,32 --out divisor.jsonl  # the divisor study
    python benchmarks/latency.py --device cuda --runtimes eager,compile --precision fp16
    python benchmarks/latency.py --divisors 32 --one-shot per-cost,share \\
        --out rules.jsonl                                             # both one-shot rules
    python benchmarks/latency.py --table --out latency.jsonl

Measure on an idle machine: every figure records the load average and threads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "regnet_y_400mf", "convnext_tiny", "vit_b_16"]
BUDGETS = [0.3, 0.5]
BATCHES = [1, 32]


def _csv(kind: type) -> Any:
    return lambda text: [kind(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", type=_csv(str), default=MODELS)
    p.add_argument("--budgets", type=_csv(float), default=BUDGETS)
    p.add_argument("--batches", type=_csv(int), default=BATCHES)
    p.add_argument("--divisors", type=_csv(int), default=[8])
    p.add_argument("--one-shot", type=_csv(str), default=["per-cost"], dest="one_shot",
                   help="one-shot rules of s2h-fx's widths, comma-separated: per-cost "
                        "(default), share")
    p.add_argument("--runtimes", type=_csv(str), default=None,
                   help="default: every runtime available on --device")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--input-size", default="3,224,224")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per model and budget")
    p.add_argument("--out", type=Path, default=Path("latency.jsonl"))
    p.add_argument("--resume", action="store_true", help="skip rows already in --out")
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    return p.parse_args(argv)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return rows


def rule_of(row: dict[str, Any]) -> str:
    """The one-shot rule of a row (rows written before there was a choice: per-cost)."""
    return row.get("one_shot") or "per-cost"


def done_keys(rows: Iterable[dict[str, Any]]) -> set[tuple[Any, ...]]:
    """(model, budget, divisor, rule, runtime, batch, precision, device) of complete
    groups: all networks of a (runtime, batch) are written together, so one row stands
    for them."""
    return {(r["model"], r["budget"], r["divisor"], rule_of(r), r["runtime"], r["batch"],
             r["precision"], r["device"]) for r in rows if r.get("network") == "dense"}


def bench_argv(args: argparse.Namespace, model: str, budget: float, divisor: int, rule: str,
               runtimes: list[str], batches: list[int]) -> list[str]:
    argv = ["bench", model, "--budget", str(budget), "--divisor", str(divisor),
            "--one-shot", rule,
            "--runtime", ",".join(runtimes), "--batch", ",".join(map(str, batches)),
            "--device", args.device, "--precision", args.precision,
            "--input-size", args.input_size, "--rounds", str(args.rounds),
            "--warmup", str(args.warmup), "--jsonl", str(args.out)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.compile_mode:
        argv += ["--compile-mode", args.compile_mode]
    return argv


def todo(args: argparse.Namespace, runtimes: list[str],
         done: set[tuple[Any, ...]]) -> list[tuple[str, float, int, str, list[str], list[int]]]:
    """(model, budget, divisor, rule, runtimes, batches) still to run; a partly done model
    reruns only its missing runtimes and batches (as a product: a little may be timed
    twice)."""
    jobs = []
    for model in args.models:
        for budget in args.budgets:
            for divisor in args.divisors:
                for rule in args.one_shot:
                    missing = [(rt, b) for rt in runtimes for b in args.batches
                               if (model, budget, divisor, rule, rt, b, args.precision,
                                   args.device) not in done]
                    if missing:
                        jobs.append((model, budget, divisor, rule,
                                     list(dict.fromkeys(rt for rt, _ in missing)),
                                     list(dict.fromkeys(b for _, b in missing))))
    return jobs


def format_table(rows: list[dict[str, Any]]) -> str:
    """Efficiency (speed-up x FLOPs ratio) of s2h-fx and Torch-Pruning per model, budget,
    divisor, one-shot rule, runtime and batch; medians in ms."""
    from s2h_fx.bench import TP_MATCHED

    head = (f"{'model':20}{'budget':>7}{'div':>4} {'rule':13}{'runtime':12}{'batch':>6}"
            f"{'dense ms':>10}"
            f"{'s2h ms':>9}{'s2h FLOPs':>10}{'s2h eff':>8}{'TP ms':>9}{'TP FLOPs':>9}"
            f"{'TP eff':>8}")
    lines = [head, "-" * len(head)]
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        key = (r["model"], r["budget"], r["divisor"], rule_of(r), r["runtime"], r["batch"])
        groups.setdefault(key, {})[r["network"]] = r

    def cell(r: dict[str, Any] | None, field: str, fmt: str, width: int) -> str:
        value = None if r is None else r.get(field)
        return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"

    for key, nets in groups.items():
        tp = nets.get("torch-pruning")
        # s2h-fx at the budget; and, where Torch-Pruning's bisection missed those FLOPs,
        # s2h-fx at Torch-Pruning's FLOPs (rule marked "@tp"): the pair to compare
        pairs = [(nets.get("s2h-fx"), key[3])]
        if TP_MATCHED in nets:
            pairs.append((nets[TP_MATCHED], key[3] + "@tp"))
        for s2h, rule in pairs:
            lines.append(f"{key[0]:20}{key[1]:7g}{key[2]:4d} {rule:13}{key[4]:12}{key[5]:6d}"
                         + cell(nets.get("dense"), "median_ms", ".2f", 10)
                         + cell(s2h, "median_ms", ".2f", 9)
                         + cell(s2h, "flops_ratio", ".3f", 10)
                         + cell(s2h, "efficiency", ".2f", 8) + cell(tp, "median_ms", ".2f", 9)
                         + cell(tp, "flops_ratio", ".3f", 9) + cell(tp, "efficiency", ".2f", 8))
    return "\n".join(lines)


def available(device: str) -> list[str]:
    from s2h_fx.deploy import available_runtimes

    return available_runtimes(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(format_table(read_rows(args.out)))
        return 0
    runtimes = args.runtimes or available(args.device)
    done = done_keys(read_rows(args.out)) if args.resume else set()
    failures = 0
    for model, budget, divisor, rule, rts, batches in todo(args, runtimes, done):
        cmd = [sys.executable, "-m", "s2h_fx",
               *bench_argv(args, model, budget, divisor, rule, rts, batches)]
        print(f"# {model} budget {budget:g} divisor {divisor} one-shot {rule}: "
              f"{', '.join(rts)} at batch "
              f"{', '.join(map(str, batches))}", flush=True)
        try:
            result = subprocess.run(cmd, timeout=args.timeout)
            failures += result.returncode != 0
        except subprocess.TimeoutExpired:
            print(f"# {model} budget {budget:g}: timed out after {args.timeout:g} s")
            failures += 1
    print(format_table(read_rows(args.out)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

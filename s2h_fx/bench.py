"""``s2h-fx bench``: dense, s2h-fx and Torch-Pruning networks at the same FLOPs, deployed
on each runtime, checked against the eager network and timed in interleaved rounds.
Where Torch-Pruning cannot reach s2h-fx's FLOPs, s2h-fx is timed at Torch-Pruning's
too (``s2h-fx@tp``).

The command's parser and its steps live here; :mod:`s2h_fx.cli` dispatches to
:func:`run` and shares its argument types and model loading.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from s2h_fx.cli import (
    MODEL_HELP,
    CliError,
    _device,
    _example_size,
    _flops,
    _image_size,
    _input_size,
    _leaves,
    _load_model,
    _non_negative_int,
    _params,
    _positive_int,
    _write_atomic,
)
from s2h_fx.config import DEFAULT_DIVISOR, ONE_SHOT_RULES, PruneConfig, default_divisor
from s2h_fx.errors import BudgetError
from s2h_fx.pruner import prune_graph
from s2h_fx.tp_match import MATCH_GAP

log = logging.getLogger(__name__)

TP_MATCHED = "s2h-fx@tp"  # s2h-fx at Torch-Pruning's FLOPs, where the bisection missed


def _comma_list(item: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [item(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}")
        return list(dict.fromkeys(values))  # drop repeats, keep the order
    return parse


def _runtime_name(text: str) -> str:
    from s2h_fx.deploy import RUNTIMES

    if text not in RUNTIMES:
        raise argparse.ArgumentTypeError(
            f"unknown runtime {text!r}; choose from {', '.join(RUNTIMES)}")
    return text


def _batch_size(text: str) -> int:
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"batch sizes must be positive integers, got {text!r}") from None


def add_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="time dense, s2h-fx and Torch-Pruning networks at the same FLOPs on "
                      "eager, torch.compile, ONNX Runtime or TensorRT",
        description="Builds the torchvision or timm model (random weights), its s2h-fx network at "
                    "--budget (one-shot widths, or --pruned FILE.pt2 from `s2h-fx prune`) and "
                    "Torch-Pruning's at the same FLOPs (pruning ratio bisected, round_to = "
                    "--divisor); deploys each on every runtime, checks it against the eager "
                    "network, times them in interleaved rounds and prints latency, "
                    "throughput, FLOPs ratio, speed-up and efficiency (speed-up x FLOPs "
                    "ratio; 1.0 = the speed-up the FLOPs promise) per runtime and batch. "
                    "Where Torch-Pruning's FLOPs land more than 5% from s2h-fx's, s2h-fx "
                    "pruned to Torch-Pruning's FLOPs is timed too, as s2h-fx@tp.")
    bench.add_argument("model", help=MODEL_HELP)
    bench.add_argument("--budget", type=float, default=None,
                       help="fraction of the FLOPs to keep, in (0, 1] (needed without --pruned)")
    bench.add_argument("--pruned", type=Path, default=None, metavar="FILE.pt2",
                       help="time this network (from `s2h-fx prune/export`) as the s2h-fx one")
    bench.add_argument("--runtime", type=_comma_list(_runtime_name, "runtimes"),
                       default=["eager"], metavar="R1,R2",
                       help="eager, compile, onnxruntime, tensorrt (default eager)")
    bench.add_argument("--batch", type=_comma_list(_batch_size, "batch sizes"), default=[1],
                       metavar="B1,B2", help="batch sizes to time (default 1)")
    bench.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                       help="fp16/bf16: half weights and inputs, CUDA only (default fp32)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument("--input-size", type=_input_size, default=None, metavar="C,H,W",
                       help="input size without batch (default: the model's own; 3,224,224 "
                            "for torchvision)")
    bench.add_argument("--divisor", type=_positive_int, default=None,
                       help="widths are multiples of this, for both pruners (default: a multiple "
                            "of every runtime's own: 32 on CPU, 8 on a GPU; 8 where 32 leaves the "
                            "budget out of reach)")
    bench.add_argument("--one-shot", choices=ONE_SHOT_RULES, default="per-cost",
                       help="the one-shot rule of s2h-fx's widths (not with --pruned): "
                            "per-cost (default) or share; see `s2h-fx prune --help`")
    bench.add_argument("--rounds", type=_positive_int, default=30,
                       help="interleaved timed rounds (default 30)")
    bench.add_argument("--warmup", type=_non_negative_int, default=5,
                       help="untimed rounds first (default 5)")
    bench.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads for torch and ONNX Runtime (default: torch's choice)")
    bench.add_argument("--compile-mode", default=None,
                       help="torch.compile mode, e.g. max-autotune (default: torch's default "
                            "on CPU, max-autotune on CUDA)")
    bench.add_argument("--no-tp", dest="tp", action="store_false",
                       help="leave Torch-Pruning out")
    bench.add_argument("--json", type=Path, default=None, metavar="OUT.json",
                       help="write every row and the environment to this JSON file")
    bench.add_argument("--jsonl", type=Path, default=None, metavar="OUT.jsonl",
                       help="append each row as a JSON line as soon as its runtime and batch "
                            "are done")
    bench.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                       help="plot speed-up against FLOPs ratio per runtime, with the ideal curve")
    bench.add_argument("--seed", type=int, default=0,
                       help="seed of the random weights and inputs (default 0)")


def _check_args(args: argparse.Namespace) -> None:
    """Every usage error before the slow steps."""
    from s2h_fx.deploy import DeployError, check_runtime

    if args.pruned is None and args.budget is None:
        raise CliError("bench needs --budget B (or --pruned FILE.pt2 to time a pruned network)")
    args.divisor_given = args.divisor is not None
    if args.divisor is None:  # widths that suit every runtime timed (multiples of each's)
        args.divisor = math.lcm(*(default_divisor(rt, args.device) for rt in args.runtime))
    if args.pruned is not None and not args.pruned.is_file():
        raise CliError(f"--pruned {str(args.pruned)!r} is not a file")
    if args.budget is not None:
        try:
            PruneConfig(args.budget, args.divisor)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    for option in ("json", "jsonl", "plot"):
        path = getattr(args, option)
        if path is not None and (path.is_dir() or not path.parent.resolve().is_dir()):
            raise CliError(f"--{option} {str(path)!r}: a directory, or its directory does "
                           "not exist")
    device = _device(args.device)
    if device.startswith("cuda") and args.compile_mode is None:
        args.compile_mode = "max-autotune"  # CUDA graphs and autotuned kernels
    for runtime in args.runtime:
        try:
            check_runtime(runtime, device, args.precision)
        except DeployError as exc:
            raise CliError(str(exc)) from exc


def _one_shot(dense: nn.Module, x: torch.Tensor, args: argparse.Namespace,
              budget: float) -> nn.Module:
    """s2h-fx's one-shot network at ``budget``, in the run's divisor and rule."""
    return prune_graph(dense, budget, (x,), divisor=args.divisor,
                       one_shot=args.one_shot).export()


def _prune(dense: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """s2h-fx's network at --budget. Where the runtimes' default divisor (32 on the CPU)
    leaves the budget out of reach (a small network), steps of 8 instead, said in the
    log; a --divisor given is kept."""
    try:
        return _one_shot(dense, x, args, args.budget)
    except BudgetError as exc:
        if getattr(args, "divisor_given", True) or args.divisor == DEFAULT_DIVISOR:
            raise
        log.warning("budget %g is out of reach in the runtimes' steps of %d (%s); pruning "
                    "in steps of %d instead, for both pruners (--divisor chooses)",
                    args.budget, args.divisor, exc, DEFAULT_DIVISOR)
        args.divisor = DEFAULT_DIVISOR
        return _one_shot(dense, x, args, args.budget)


def _networks(args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """dense, s2h-fx, (unless --no-tp) Torch-Pruning and, where its FLOPs missed
    s2h-fx's, s2h-fx at its FLOPs; and what each row shares."""
    from s2h_fx.deploy import load_program
    from s2h_fx.tp_match import match_flops

    torch.manual_seed(args.seed)
    if args.pruned is not None:
        pruned = load_program(args.pruned)
        x = torch.randn(1, *_example_size(args))
        try:
            with torch.no_grad():
                classes = _leaves(pruned(x))[0].shape[-1]
        except Exception as exc:  # wrong input size for this network, mostly
            raise CliError(f"{args.pruned} does not run on an input of shape {tuple(x.shape)} "
                           f"(pass the --input-size it was pruned at): {exc}") from exc
        dense = _load_model(args.model, num_classes=classes, image_size=_image_size(args))
    else:
        dense = _load_model(args.model, image_size=_image_size(args))
        x = torch.randn(1, *_example_size(args))
        pruned = _prune(dense, x, args)
    dense_flops = _flops(dense, x)
    networks = {"dense": dense.eval(), "s2h-fx": pruned.eval()}
    flops = {"dense": dense_flops, "s2h-fx": _flops(pruned, x)}
    meta: dict[str, Any] = {}
    if args.tp:
        try:
            tp = match_flops(dense, x, flops["s2h-fx"] / dense_flops, round_to=args.divisor)
        except Exception as exc:  # Torch-Pruning fails on some models; time the others
            log.warning("Torch-Pruning failed on %s: %s: %s", args.model, type(exc).__name__, exc)
            meta["tp_error"] = f"{type(exc).__name__}: {exc}"
        else:
            networks["torch-pruning"] = tp.model
            flops["torch-pruning"] = _flops(tp.model, x)
            meta["tp_pruning_ratio"] = tp.pruning_ratio
            if flops["s2h-fx"] > 0:
                meta["tp_flops_gap"] = flops["torch-pruning"] / flops["s2h-fx"] - 1.0
                if abs(meta["tp_flops_gap"]) > MATCH_GAP:
                    _match_tp(dense, x, args, networks, flops)
    args.input_size = tuple(x.shape[1:])  # what every row is timed at
    meta["flops"] = flops
    meta["params"] = {name: _params(m) for name, m in networks.items()}
    return networks, meta


def _match_tp(dense: nn.Module, x: torch.Tensor, args: argparse.Namespace,
              networks: dict[str, nn.Module], flops: dict[str, float]) -> None:
    """Torch-Pruning's bisection could not reach s2h-fx's FLOPs (it leaves grouped
    convolutions whole, its steps are coarse), so the two are not compared at the same
    FLOPs: efficiency falls as FLOPs fall (the fixed costs stay), and the network with
    more FLOPs would look better. Adds s2h-fx's one-shot network at Torch-Pruning's FLOPs,
    ``s2h-fx@tp``, to time beside it (not for ``--pruned``: its widths were trained).
    Where that fails, the bench goes on without it, saying why."""
    reached = flops["torch-pruning"] / flops["dense"]
    missed = (f"Torch-Pruning reached FLOPs ratio {reached:.3f}, not s2h-fx's "
              f"{flops['s2h-fx'] / flops['dense']:.3f}")
    if args.pruned is not None or not 0 < reached < 1:
        log.warning("%s: their efficiencies are not at the same FLOPs", missed)
        return
    try:
        at_tp = _one_shot(dense, x, args, reached)
    except Exception as exc:  # one more network failing is a warning, not the end
        log.warning("%s, and s2h-fx cannot be pruned to it: %s: %s", missed,
                    type(exc).__name__, exc)
        return
    networks[TP_MATCHED] = at_tp.eval()
    flops[TP_MATCHED] = _flops(at_tp, x)
    log.warning("%s; timing s2h-fx at %.3f too, as %s", missed,
                flops[TP_MATCHED] / flops["dense"], TP_MATCHED)
    if abs(flops[TP_MATCHED] / flops["torch-pruning"] - 1.0) > MATCH_GAP:
        log.warning("%s lands at FLOPs ratio %.3f, still more than %.0f%% from "
                    "Torch-Pruning's", TP_MATCHED, flops[TP_MATCHED] / flops["dense"],
                    100 * MATCH_GAP)


def _time_group(args: argparse.Namespace, networks: dict[str, nn.Module], meta: dict[str, Any],
                 runtime: str, batch: int) -> list[dict[str, Any]]:
    """Deploy, check and time every network on one runtime at one batch size: one row each."""
    from s2h_fx.deploy import TOLERANCE, Deployed, DeployError, check, deploy
    from s2h_fx.timing import environment, time_interleaved

    torch.manual_seed(args.seed + batch)
    x = torch.randn(batch, *args.input_size)
    base = {"model": args.model, "runtime": runtime, "batch": batch,
            "precision": args.precision, "device": args.device,
            "input_size": list(args.input_size), "budget": args.budget,
            "divisor": args.divisor, "pruned_file": str(args.pruned) if args.pruned else None,
            "one_shot": None if args.pruned else args.one_shot,
            "rounds": args.rounds, "warmup": args.warmup,
            "tolerance": TOLERANCE[args.precision]}
    deployed: dict[str, Deployed] = {}
    errors: dict[str, float | str] = {}
    for name, module in networks.items():
        try:
            deployed[name] = deploy(module, x, runtime, device=args.device,
                                    precision=args.precision, compile_mode=args.compile_mode,
                                    threads=torch.get_num_threads())
            errors[name] = check(deployed[name], module, x)
        except Exception as exc:  # one network failing to deploy is a row, not the end
            kind = "check" if isinstance(exc, DeployError) and name in deployed else "deploy"
            log.warning("%s on %s, batch %d: %s failed: %s", name, runtime, batch, kind, exc)
            deployed.pop(name, None)
            errors[name] = f"{kind}: {type(exc).__name__}: {exc}"
    timings = time_interleaved({n: d.run for n, d in deployed.items()}, batch,
                               rounds=args.rounds, warmup=args.warmup, device=args.device)
    env = environment(args.device)
    dense_ms = timings["dense"].median_ms if "dense" in timings else None
    rows = []
    for name in networks:
        row = {**base, "network": name, "flops": meta["flops"][name] * batch,
               "flops_ratio": meta["flops"][name] / meta["flops"]["dense"],
               "params": meta["params"][name], "env": env}
        if name == "torch-pruning":
            row["tp_pruning_ratio"] = meta["tp_pruning_ratio"]
            row["tp_flops_gap"] = meta.get("tp_flops_gap")
        if name in timings:
            t = timings[name]
            row.update(t.summary(), max_rel_error=errors[name], info=deployed[name].info)
            row["speedup"] = dense_ms / t.median_ms if dense_ms else None
            row["efficiency"] = (row["speedup"] * row["flops_ratio"]
                                 if row["speedup"] is not None else None)
        else:
            row["error"] = errors[name]
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'network':15}{'GFLOPs':>9}{'FLOPs':>7}{'median ms':>11}{'p90 ms':>9}"
            f"{'img/s':>10}{'speed-up':>10}{'effic.':>8}")
    lines = []
    for key in dict.fromkeys((r["runtime"], r["batch"]) for r in rows):
        group = [r for r in rows if (r["runtime"], r["batch"]) == key]
        lines += [f"{key[0]}, batch {key[1]}, {group[0]['precision']}, {group[0]['device']}",
                  head, "-" * len(head)]
        for r in group:
            if "error" in r:
                lines.append(f"{r['network']:15}{r['flops'] / 1e9:9.3f}{r['flops_ratio']:7.3f}"
                             f"  {r['error'][:70]}")
                continue
            lines.append(f"{r['network']:15}{r['flops'] / 1e9:9.3f}{r['flops_ratio']:7.3f}"
                         f"{r['median_ms']:11.3f}{r['p90_ms']:9.3f}{r['throughput']:10.1f}"
                         f"{r['speedup'] or float('nan'):9.2f}x{r['efficiency'] or float('nan'):8.2f}")
        lines.append("")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("speedup") and r["network"] != "dense"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    low = min([r["flops_ratio"] for r in timed] + [0.2])
    grid = [low + (1 - low) * i / 50 for i in range(51)]
    ax.plot(grid, [1 / g for g in grid], "k--", lw=1, label="ideal: speed-up = 1 / FLOPs ratio")
    markers = {"s2h-fx": "o", "torch-pruning": "s", TP_MATCHED: "^"}
    for i, runtime in enumerate(dict.fromkeys(r["runtime"] for r in timed)):
        for net, marker in markers.items():
            pts = [r for r in timed if r["runtime"] == runtime and r["network"] == net]
            if pts:
                ax.scatter([r["flops_ratio"] for r in pts], [r["speedup"] for r in pts],
                           marker=marker, color=f"C{i}", label=f"{runtime}: {net}")
    ax.set(xlabel="FLOPs ratio (pruned / dense)", ylabel="measured speed-up over dense",
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command: 0 when every network deployed, checked and timed, 1 otherwise."""
    from s2h_fx.timing import environment

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    networks, meta = _networks(args)
    ratios = {n: f / meta["flops"]["dense"] for n, f in meta["flops"].items() if n != "dense"}
    print(f"{args.model}: FLOPs ratio " + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items())
          + (f"; torch-pruning failed: {meta['tp_error']}" if "tp_error" in meta else ""))
    rows: list[dict[str, Any]] = []
    for runtime in args.runtime:
        for batch in args.batch:
            group = _time_group(args, networks, meta, runtime, batch)
            rows += group
            print(_table(group), flush=True)
            if args.jsonl is not None:
                with args.jsonl.open("a", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in group)
    if args.json is not None:
        doc = {"rows": rows, "environment": environment(args.device)}
        text = json.dumps(doc, indent=1).encode()

        def write(f: IO[bytes]) -> None:
            f.write(text)
        _write_atomic(args.json, write)
        print(f"wrote {args.json} ({len(rows)} rows)")
    if args.plot is not None:
        _plot(rows, args.plot, f"{args.model}: speed-up against FLOPs ratio")
        print(f"wrote {args.plot}")
    return 1 if any("error" in r for r in rows) else 0

"""Zoo coverage: s2h-fx and Torch-Pruning on every torchvision classification model.

For each model (one subprocess per model, so a crash or a hang is one row and not
the end of the run):

- s2h-fx: ``prune_graph`` at ``--budget``, ``export``, and the check that matters:
  the hard network ``pruner(x)`` (eval mode) equals the exported graph.
- Torch-Pruning: ``MetaPruner`` with L1 magnitude importance, the classifier
  ignored, ``pruning_ratio`` bisected so that its FLOPs ratio matches the one
  s2h-fx measured (at most ``TP_TRIALS`` trials, each on a fresh deepcopy).

FLOPs are ``torch.utils.flop_counter`` FLOPs of the physically pruned model over
those of the dense model, measured on the same input. A FLOPs ratio is not a
speed-up.

    python benchmarks/zoo.py --jobs 2 --out zoo.jsonl
    python benchmarks/zoo.py --models resnet18,vit_b_16 --input-size 3,64,64
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from s2h_fx.measure import counted_paths
from s2h_fx.tp_match import bisect_ratio, find_classifier  # quality.py uses both from here

TOLERANCE = 1e-5      # max relative error for "exported == hard network"
TP_TRIALS = 6         # bisection trials for Torch-Pruning's pruning_ratio
TP_RATIO_TOL = 0.01   # stop bisecting when |tp ratio - target| is below this

Row = dict[str, Any]


# ---- model and input ----------------------------------------------------------

def all_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def default_input_size(name: str) -> tuple[int, int, int]:
    """The input a model built with ``weights=None`` expects.

    The smallest crop size over the model's published weights: with
    ``weights=None`` ViTs are built for 224 (their DEFAULT SWAG weights say 518
    or 384), inception_v3 wants 299, EfficientNets their native size.
    """
    try:
        sizes = [w.transforms().crop_size[0] for w in torchvision.models.get_model_weights(name)]
    except Exception:  # no weights enum, or transforms without crop_size
        sizes = []
    side = min(sizes) if sizes else 224
    return (3, side, side)


def build(name: str, input_size: tuple[int, ...], seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, *input_size)
    return model, x


def count_flops(module: nn.Module, x: torch.Tensor) -> tuple[int, Any]:
    """flop_counter FLOPs of one forward, and its output.

    Parameters are counted with ``requires_grad`` off (restored after): flop_counter's
    module tracker asserts on a tensor that requires grad but has no grad_fn under
    ``no_grad`` (timm's CaiT passes an expanded class token to its blocks)."""
    params = [p for p in module.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad(), counted_paths(), FlopCounterMode(display=False) as counter:
            out = module(x)
    finally:
        for p in params:
            p.requires_grad_(True)
    return counter.get_total_flops(), out


def max_rel_err(a: Any, b: Any) -> float:
    """max|a - b| / max|b| over all output tensors."""
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return math.inf
    num = max(float((p - q).abs().max()) for p, q in zip(la, lb))
    den = max(float(q.abs().max()) for q in lb)
    return num / den if den > 0 else num


def shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def short_error(exc: BaseException, limit: int = 240) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_site(exc: BaseException) -> str | None:
    """The innermost frame in the library (s2h_fx/ or passes/), for bug reports."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/s2h_fx/" in f.filename or "/passes/" in f.filename]
    if not ours:
        return None
    f = ours[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


# ---- s2h-fx ---------------------------------------------------------------------

def measure_s2h(model: nn.Module, x: torch.Tensor, budget: float, dense: tuple[int, Any],
                inspect: Callable[[Any], Row] | None = None) -> Row:
    """prune_graph + export, then hard network vs exported graph.

    A failure records the error, the step it happened in (``error_step``) and
    the innermost library frame (``error_at``). ``inspect(pruner)``, when given,
    adds its columns to the row right after ``prune_graph`` (``inspect(None)`` when
    ``prune_graph`` failed).
    """
    import s2h_fx

    row: Row = {}
    step = "prune_graph"
    t0 = time.perf_counter()
    try:
        pruner = s2h_fx.prune_graph(model, budget=budget, example_inputs=(x,))
        row.update(traced=True, groups=len(pruner.grouping.prunable),
                   frozen=len(pruner.grouping.frozen))
        if inspect is not None:
            row.update(inspect(pruner))
        step = "export"
        pruned = pruner.export()
        row.update(seconds=time.perf_counter() - t0, exported=True)
        row["model_flops_ratio"] = float(pruner.flops_ratio())
        step = "run exported graph"
        pruned_flops, y_pruned = count_flops(pruned, x)
        row["flops_ratio"] = pruned_flops / dense[0] if dense[0] else None
        row["same_shape"] = shapes(y_pruned) == shapes(dense[1])
        step = "run hard network (pruner in eval mode)"
        pruner.eval()
        with torch.no_grad():
            y_hard = pruner(x)
        row["max_rel_err"] = max_rel_err(y_hard, y_pruned)
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        in_trace = any(f.filename.endswith("trace_model.py") for f in frames)
        row.setdefault("traced", not (in_trace or type(exc).__name__ == "TraceError"))
        if inspect is not None and step == "prune_graph":
            row.update(inspect(None))
        row.update(error=short_error(exc), error_step=step, error_at=error_site(exc))
    row["ok"] = bool(row.get("exported")) and row.get("max_rel_err", math.inf) < TOLERANCE
    return row


# ---- Torch-Pruning ----------------------------------------------------------------

def tp_trial(model: nn.Module, x: torch.Tensor, ratio: float,
             classifier: str | None, copy_model: bool = True) -> tuple[nn.Module, float]:
    """Prune a deepcopy of ``model`` (``model`` itself with ``copy_model=False``) at
    ``pruning_ratio=ratio``; (pruned model, build+prune seconds, the copy not counted)."""
    import torch_pruning as tp

    work = copy.deepcopy(model) if copy_model else model
    ignored = [work.get_submodule(classifier)] if classifier else []
    importance = tp.importance.MagnitudeImportance(p=1)
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(work, x, importance=importance, pruning_ratio=ratio,
                                  ignored_layers=ignored)
    pruner.step()
    return work.eval(), time.perf_counter() - t0


def bisect_tp(trial: Callable[[float], tuple[float, Any]], target: float) -> tuple[float, Any]:
    """Bisect pruning_ratio so that ``trial(ratio)[0]`` (a FLOPs ratio) meets ``target``
    (:func:`s2h_fx.tp_match.bisect_ratio`, with this module's ``TP_TRIALS`` and
    ``TP_RATIO_TOL``, which callers may set). Returns the trial closest to the target:
    (pruning_ratio, what trial returned)."""
    def whole(ratio: float) -> tuple[float, Any]:
        result = trial(ratio)
        return result[0], result

    ratio, _, result, _ = bisect_ratio(whole, target, trials=TP_TRIALS, tol=TP_RATIO_TOL)
    return ratio, result


def measure_tp(model: nn.Module, x: torch.Tensor, target: float, dense: tuple[int, Any],
               on_trial: Callable[[Row], None] | None = None) -> Row:
    """Torch-Pruning at the FLOPs ratio ``target``; failures are recorded, not raised.

    After each trial the row holds the closest trial so far and goes to
    ``on_trial``, so a timeout in the middle of the bisection still reports it.
    """
    row: Row = {"tp_ok": False, "tp_target": target, "tp_trials": 0}
    try:
        classifier = find_classifier(model, x)
        row["tp_ignored"] = classifier

        def trial(ratio: float) -> tuple[float, Row]:
            pruned, seconds = tp_trial(model, x, ratio, classifier)
            flops, out = count_flops(pruned, x)
            result = {"tp_pruning_ratio": ratio, "tp_flops_ratio": flops / dense[0],
                      "tp_seconds": seconds, "tp_ok": shapes(out) == shapes(dense[1]),
                      "tp_shapes": shapes(out)}
            row["tp_trials"] += 1
            best = row.get("tp_flops_ratio")
            if best is None or abs(result["tp_flops_ratio"] - target) < abs(best - target):
                row.update(result)
            if on_trial is not None:
                on_trial(row)
            return result["tp_flops_ratio"], result

        _, (_, result) = bisect_tp(trial, target)
        row.update(result)
        shape = row.pop("tp_shapes")
        if not row["tp_ok"]:
            row["tp_error"] = f"output shape {shape} != dense {shapes(dense[1])}"
    except Exception as exc:
        row.pop("tp_shapes", None)
        row["tp_error"] = short_error(exc)
    return row


# ---- one model (runs in the subprocess) ---------------------------------------------

def empty_row(name: str) -> Row:
    return {
        "model": name, "traced": False, "groups": None, "frozen": None, "exported": False,
        "max_rel_err": None, "ok": False, "flops_ratio": None, "model_flops_ratio": None,
        "seconds": None, "error": None,
        "tp_ok": False, "tp_flops_ratio": None, "tp_seconds": None, "tp_error": None,
    }


def measure_model(name: str, budget: float, input_size: tuple[int, ...], seed: int = 0,
                  on_stage: Callable[[Row, str], None] | None = None,
                  build_fn: Callable[[str, tuple[int, ...], int], tuple[nn.Module, torch.Tensor]]
                  | None = None,
                  inspect: Callable[[Any], Row] | None = None) -> Row:
    """Everything for one model.

    ``on_stage(row, stage)`` gets the partial row after s2h-fx (stage "s2h") and
    after each Torch-Pruning trial (stage "tp"), so a timeout keeps what was measured.
    ``build_fn`` builds (model, input) (default: torchvision's :func:`build`);
    ``inspect`` goes to :func:`measure_s2h`.
    """
    row = empty_row(name)
    row.update(input_size=list(input_size), budget=budget)
    try:
        model, x = (build_fn or build)(name, input_size, seed)
        dense = count_flops(model, x)
    except Exception as exc:
        row.update(error=f"building/running the dense model: {short_error(exc)}",
                   tp_error="dense model failed")
        return row
    row["dense_flops"] = dense[0]
    row.update(measure_s2h(model, x, budget, dense, inspect))
    if on_stage is not None:
        on_stage(row, "s2h")
    target = row["flops_ratio"] if row["flops_ratio"] is not None else budget
    on_trial = None if on_stage is None else (lambda r: on_stage({**row, **r}, "tp"))
    row.update(measure_tp(model, x, target, dense, on_trial))
    return row


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_row(path: str, row: Row, stage: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**{k: _finite(v) for k, v in row.items()}, "stage": stage}, f)
    os.replace(tmp, path)


def run_one(args: argparse.Namespace, build_fn: Any = None,
            default_size: Callable[[str], tuple[int, ...]] = default_input_size,
            inspect: Callable[[Any], Row] | None = None) -> int:
    """Subprocess mode (``--one NAME``): measure one model, the row goes to ``--row-file``."""
    torch.set_num_threads(args.threads)
    size = args.input_size or default_size(args.one)
    row = measure_model(args.one, args.budget, size, args.seed,
                        on_stage=lambda r, stage: write_row(args.row_file, r, stage),
                        build_fn=build_fn, inspect=inspect)
    write_row(args.row_file, row, "done")
    return 0


# ---- the sweep (parent process) --------------------------------------------------------

def run_subprocess(name: str, args: argparse.Namespace, threads: int,
                   script: str | None = None) -> Row:
    """One model in a fresh interpreter running ``script --one name`` (default: this
    file); a timeout or a crash becomes the row's error."""
    with tempfile.TemporaryDirectory() as tmp:
        row_file = os.path.join(tmp, "row.json")
        cmd = [sys.executable, str(Path(script or __file__).resolve()), "--one", name,
               "--budget", str(args.budget), "--seed", str(args.seed),
               "--threads", str(threads), "--row-file", row_file]
        if args.input_size:
            cmd += ["--input-size", ",".join(map(str, args.input_size))]
        cmd += list(getattr(args, "child_args", ()))  # a caller's own options
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            failure = None if proc.returncode == 0 else (
                f"subprocess exit {proc.returncode}: {_tail(proc.stderr)}")
        except subprocess.TimeoutExpired:
            failure = f"timeout after {args.timeout:g} s"
        row = empty_row(name)
        if os.path.exists(row_file):
            with open(row_file) as f:
                row.update(json.load(f))
        stage = row.pop("stage", None)
        if failure and stage is None:  # died before s2h-fx finished: traced is unknown
            row.update(traced=None, error=failure, tp_error="not run")
        elif failure and stage == "s2h":
            row["tp_error"] = failure
        elif failure and stage == "tp":
            row["tp_error"] = (f"{failure} after {row.get('tp_trials')} bisection trial(s); "
                               "the closest one is shown")
        row["wall_seconds"] = time.perf_counter() - t0
        return row


def _tail(text: str, limit: int = 240) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return last[-limit:]


def sweep(names: list[str], args: argparse.Namespace,
          on_row: Callable[[Row], None] | None = None, script: str | None = None) -> list[Row]:
    """Each model in its own subprocess (``script``, default this file), ``args.jobs`` at once."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    rows: dict[str, Row] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_subprocess, n, args, threads, script): n for n in names}
        for i, fut in enumerate(as_completed(futures), 1):
            row = fut.result()
            rows[row["model"]] = row
            print(f"[{i}/{len(names)}] {progress(row)}", file=sys.stderr, flush=True)
            if on_row is not None:
                on_row(row)
    return [rows[n] for n in names]


# ---- reporting (pure functions of the rows) ------------------------------------------------

COLUMNS = ["model", "traced", "groups", "frozen", "exported", "max rel err", "FLOPs ratio",
           "s", "|", "TP ok", "TP FLOPs ratio", "TP s"]


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "err":
        return f"{value:.1e}"
    if kind == "ratio":
        return f"{value:.3f}"
    if kind == "s":
        return f"{value:.2f}"
    return str(value)


def table_cells(row: Row) -> list[str]:
    return [
        row["model"], _fmt(row.get("traced")), _fmt(row.get("groups")), _fmt(row.get("frozen")),
        _fmt(row.get("exported")), _fmt(row.get("max_rel_err"), "err"),
        _fmt(row.get("flops_ratio"), "ratio"), _fmt(row.get("seconds"), "s"), "|",
        _fmt(row.get("tp_ok")), _fmt(row.get("tp_flops_ratio"), "ratio"),
        _fmt(row.get("tp_seconds"), "s"),
    ]


def format_table(rows: Iterable[Row]) -> str:
    body = [table_cells(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *body)]
    lines = []
    for cells in [COLUMNS, *body]:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        lines.append("  ".join([first, *rest]).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_failures(rows: Iterable[Row]) -> str:
    """s2h-fx failures (not ok), one line each with the error and where it was raised."""
    lines = []
    for r in rows:
        if r.get("ok"):
            continue
        why = r.get("error") or f"max_rel_err {_fmt(r.get('max_rel_err'), 'err')} >= {TOLERANCE:g}"
        where = [r[k] for k in ("error_step", "error_at") if r.get(k)]
        at = f" [{'; '.join(where)}]" if where else ""
        lines.append(f"  {r['model']}: {why}{at}")
    return "s2h-fx failures:\n" + "\n".join(lines) if lines else "s2h-fx failures: none"


def summary_line(rows: list[Row]) -> str:
    k = sum(bool(r.get("ok")) for r in rows)
    j = sum(bool(r.get("tp_ok")) for r in rows)
    n = len(rows)
    return (f"s2h-fx: {k}/{n} exported == hard network; "
            f"Torch-Pruning: {j}/{n} pruned and ran")


def progress(row: Row) -> str:
    s2h = "ok" if row.get("ok") else f"FAIL ({row.get('error') or 'max_rel_err'})"
    tp = "ok" if row.get("tp_ok") else f"FAIL ({row.get('tp_error')})"
    return f"{row['model']}: s2h-fx {s2h}; Torch-Pruning {tp}"


def summary_record(rows: list[Row], args: argparse.Namespace) -> Row:
    import torch_pruning as tp

    import s2h_fx

    return {
        "summary": True, "models": len(rows), "s2h_ok": sum(bool(r.get("ok")) for r in rows),
        "tp_ok": sum(bool(r.get("tp_ok")) for r in rows), "budget": args.budget,
        "input_size": args.input_size, "timeout_s": args.timeout, "jobs": args.jobs,
        "seed": args.seed, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "torch_pruning": tp.__version__, "s2h_fx": s2h_fx.__version__,
        "s2h_fx_path": str(Path(s2h_fx.__file__).parent),
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "line": summary_line(rows),
    }


# ---- command line ---------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.5, help="FLOPs fraction to keep")
    p.add_argument("--models", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--input-size", type=parse_size, default=None,
                   help="C,H,W for every model (default: each model's own, see default_input_size)")
    p.add_argument("--out", default="results.jsonl", help="JSON lines output")
    p.add_argument("--jobs", type=int, default=1, help="models run in parallel")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per model (default: cpu_count // jobs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="keep the model rows already in --out and run only the others")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)       # subprocess mode
    p.add_argument("--row-file", default=None, help=argparse.SUPPRESS)  # subprocess mode
    return p.parse_args(argv)


def previous_rows(path: str, names: list[str]) -> dict[str, Row]:
    """Model rows already in ``path`` (for --resume); the summary record is dropped."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["model"]: r for r in records if not r.get("summary") and r.get("model") in names}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        return run_one(args)
    names = args.models.split(",") if args.models else all_models()
    unknown = sorted(set(names) - set(all_models()))
    if unknown:
        raise SystemExit(f"unknown models: {', '.join(unknown)}")
    done = previous_rows(args.out, names) if args.resume else {}
    with open(args.out, "w") as out:
        def write(row: Row) -> None:
            out.write(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n")
            out.flush()

        for row in done.values():
            write(row)
        new = sweep([n for n in names if n not in done], args, on_row=write)
        rows = [done.get(n) or next(r for r in new if r["model"] == n) for n in names]
        write(summary_record(rows, args))
    print(format_table(rows))
    print()
    print(format_failures(rows))
    print(summary_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""timm coverage: s2h-fx and Torch-Pruning on timm's models, as a new user would try them.

Every model of ``timm.list_models()`` (or ``--sample``: one model per timm module,
see :func:`sample_models`), random weights, the model's default input size (its
``pretrained_cfg.input_size``), budget 0.5, one subprocess per model with a
time-out. The measuring is :mod:`benchmarks.zoo`'s (``zoo.py``): s2h-fx's
``prune_graph`` + ``export`` and the check exported == hard network (max rel err
< 1e-5); Torch-Pruning's default API (``MetaPruner``, L1 importance, classifier
ignored) bisected to s2h-fx's FLOPs ratio. This file adds the timm model builder
and these s2h-fx columns:

- ``trace``: how the tracer got through: ``fx`` (plain torch.fx), ``timm`` (with
  timm's not-traceable modules as leaves / functions autowrapped), ``leaf
  fallback`` (a failing submodule made a leaf), or ``failed`` (the reason is the
  row's error);
- ``attention_pruned``: whether a prunable group holds the output channels of a
  q/k/v/qkv/proj linear of an attention module; ``attention_mode``: what the default
  ``attention="auto"`` chose (``both``: whole heads and their widths, ``heads`` where
  no head width prunes, ``width`` where whole heads would freeze more).

    python benchmarks/timm_zoo.py --sample --jobs 1 --timeout 120 --out timm.jsonl
    python benchmarks/timm_zoo.py --models test_vit,test_resnet --input-size 3,32,32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402  (benchmarks/ is not a package)
from zoo import Row, _finite, _fmt, previous_rows, sweep  # noqa: E402

# ---- models -------------------------------------------------------------------------

# timm's tiny test configs are not models a user prunes: --sample skips them
SAMPLE_EXCLUDE = ("test_*",)
PARAMS_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "s2h-fx"


def all_models() -> list[str]:
    import timm

    return list(timm.list_models())


def default_input_size(name: str) -> tuple[int, ...]:
    """The model's ``pretrained_cfg.input_size`` (3, 224, 224 when it has none)."""
    import timm

    try:
        size = timm.models.get_pretrained_cfg(name).input_size
    except Exception:  # no pretrained cfg
        size = None
    return tuple(size) if size else (3, 224, 224)


def build(name: str, input_size: tuple[int, ...], seed: int) -> tuple[nn.Module, torch.Tensor]:
    """timm's model with random weights, in eval mode, at ``input_size`` (its
    ``img_size`` is set where the model takes one, as a user would)."""
    import timm

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if tuple(input_size[1:]) != tuple(default_input_size(name)[1:]):
        kwargs["img_size"] = tuple(input_size[1:])
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError:  # the model has no img_size argument: it adapts to its input
        model = timm.create_model(name, pretrained=False)
    return model.eval(), torch.randn(1, *input_size)


def param_counts(names: Iterable[str]) -> dict[str, int]:
    """Parameter count of each model, built on the meta device (no memory, no init),
    cached per timm version in ``~/.cache/s2h-fx``; -1 where building fails."""
    import timm

    path = PARAMS_CACHE / f"timm-{timm.__version__}-params.json"
    cache: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
    missing = [n for n in names if n not in cache]
    for i, name in enumerate(missing):
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            cache[name] = sum(p.numel() for p in model.parameters())
        except Exception:
            cache[name] = -1
        if i % 100 == 99 or i == len(missing) - 1:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache))
    return {n: cache[n] for n in names}


def sample_models() -> list[str]:
    """One model per timm module (``timm.models.<module>`` file): the one with the fewest
    parameters (counted on the meta device, ties by name), timm's ``test_*`` configs
    left out. Deterministic for one timm version; sorted by name."""
    import timm

    chosen = []
    for module in timm.list_modules():
        names = timm.list_models(module=module, exclude_filters=list(SAMPLE_EXCLUDE))
        counts = param_counts(names)
        ok = [n for n in names if counts[n] >= 0] or names
        if ok:
            chosen.append(min(ok, key=lambda n: (counts.get(n, 0), n)))
    return sorted(set(chosen))


# ---- the s2h-fx columns this benchmark adds ---------------------------------------------

ATTN_LINEARS = {"q", "k", "v", "qkv", "kv", "qk", "proj", "q_proj", "k_proj", "v_proj",
                "o_proj", "out_proj", "in_proj"}
# a projection wrapped by the role it plays (timm's MultiQueryAttention2d: attn.query.proj)
ATTN_ROLES = {"query", "key", "value", "output"}
_ATTN_PARENT = re.compile(r"attn|attention", re.IGNORECASE)
# a producer's output channels: "blocks.0.attn.qkv:out" (a module), or a parameter's
# axis 0 where the graph reads the weight itself ("...weight[0]", "...in_proj_weight[0]")
_MEMBER = re.compile(r"^(?P<path>.+?)(?::out|\.(?P<param>weight|in_proj_weight)\[0\])$")


def is_attention_output(member: str, gm: nn.Module) -> bool:
    """``member`` ("blocks.0.attn.qkv:out", "...qkv.weight[0]") is the output channels of a q/k/v/qkv/proj
    linear whose parent is an attention module (by class or attribute name; a ``proj``
    inside ``query``/``key``/``value``/``output`` looks one level higher), or of an
    ``nn.MultiheadAttention``'s packed input projection."""
    m = _MEMBER.match(member)
    if m is None:
        return False
    path = m["path"]
    if m["param"] == "in_proj_weight":
        return True
    parent, _, leaf = path.rpartition(".")
    if leaf == "proj" and parent.rpartition(".")[2] in ATTN_ROLES:
        parent = parent.rpartition(".")[0]
    elif leaf not in ATTN_LINEARS:
        return False
    try:
        parent_cls = type(gm.get_submodule(parent)).__name__ if parent else ""
    except AttributeError:  # the traced graph module flattens some containers
        parent_cls = ""
    return bool(_ATTN_PARENT.search(parent.rpartition(".")[2]) or _ATTN_PARENT.search(parent_cls))


def trace_columns(meta: dict[str, Any] | None) -> Row:
    """``trace`` and ``trace_leaves`` / ``trace_autowrap`` from ``gm.meta["s2h_trace"]``."""
    meta = meta or {}
    leaves = dict(meta.get("leaves", {}))
    autowrap = dict(meta.get("autowrap", {}))
    return {"trace": meta.get("method", "fx"), "trace_leaves": leaves or None,
            "trace_autowrap": autowrap or None}


TRACED: dict[str, Any] = {}  # gm.meta["s2h_trace"] of the last model traced (subprocess)


def record_traces() -> None:
    """Keep each traced graph's ``gm.meta["s2h_trace"]`` in ``TRACED``, so that a row
    says how its model was traced even when ``prune_graph`` fails after tracing
    (``BudgetError``). Subprocess mode only: it wraps the tracer ``prune_graph`` calls."""
    import s2h_fx.pruner as pruner_module

    trace = pruner_module.trace_model

    def recording(*args: Any, **kwargs: Any) -> Any:
        gm = trace(*args, **kwargs)
        TRACED.clear()
        TRACED.update(gm.meta.get("s2h_trace", {}))
        return gm

    pruner_module.trace_model = recording


def inspect_pruner(pruner: Any) -> Row:
    """The timm columns: how the model was traced, and (given a pruner, i.e. when
    ``prune_graph`` succeeded) whether attention is pruned."""
    row = trace_columns(TRACED) if TRACED else {"trace": "failed"}
    if pruner is not None:
        gm = pruner.graph_module
        row["attention_pruned"] = any(
            is_attention_output(member, gm)
            for g in pruner.grouping.prunable for member in g.members)
        row["attention_mode"] = pruner.grouping.attention  # what "auto" chose
    return row


def finish_row(row: Row) -> Row:
    """Columns read from the rest of the row: ``trace`` on failure, the FLOPs check."""
    if not row.get("trace") and row.get("traced") is False:
        row["trace"] = "failed"
    ratio, budget = row.get("flops_ratio"), row.get("budget")
    row["within_budget"] = (None if ratio is None or budget is None
                            else bool(ratio <= budget + BUDGET_SLACK))
    row["error_type"] = error_type(row)
    return row


BUDGET_SLACK = 0.005  # FLOPs ratio must be <= budget + this


def error_type(row: Row) -> str | None:
    """'TraceError', 'BudgetError', ..., 'timeout', 'crash', 'mismatch' or None (ok)."""
    if row.get("ok"):
        return None
    err = row.get("error") or ""
    if err.startswith("timeout"):
        return "timeout"
    if err.startswith("subprocess exit"):
        return "crash"
    if err.startswith("building/running the dense model"):
        return "dense model fails"
    m = re.match(r"(\w+):", err)
    return m[1] if m else "mismatch"


# ---- reporting --------------------------------------------------------------------------

COLUMNS = ["model", "input", "trace", "groups", "frozen", "exp==hard", "rel err", "FLOPs",
           "attn", "s", "|", "TP ok", "TP FLOPs", "TP s", "error"]


def table_cells(row: Row) -> list[str]:
    size = row.get("input_size")
    err = row.get("error") or ("" if row.get("ok") else row.get("tp_error") or "")
    return [
        row["model"], "x".join(map(str, size[1:])) if size else "-", _fmt(row.get("trace")),
        _fmt(row.get("groups")), _fmt(row.get("frozen")), _fmt(row.get("ok")),
        _fmt(row.get("max_rel_err"), "err"), _fmt(row.get("flops_ratio"), "ratio"),
        _fmt(row.get("attention_pruned")), _fmt(row.get("seconds"), "s"), "|",
        _fmt(row.get("tp_ok")), _fmt(row.get("tp_flops_ratio"), "ratio"),
        _fmt(row.get("tp_seconds"), "s"), err[:70],
    ]


def format_table(rows: Iterable[Row]) -> str:
    body = [table_cells(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *body)]
    lines = []
    for cells in [COLUMNS, *body]:
        first = cells[0].ljust(widths[0])
        middle = [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1])]
        lines.append("  ".join([first, *middle, cells[-1]]).rstrip())
    lines.insert(1, "-" * max(len(ln) for ln in lines))
    return "\n".join(lines)


def summary(rows: list[Row]) -> Row:
    """Counts: s2h-fx ok, failures by type, trace methods, TP ok."""
    failures = Counter(r["error_type"] for r in rows if r.get("error_type"))
    return {
        "models": len(rows), "s2h_ok": sum(bool(r.get("ok")) for r in rows),
        "s2h_failures": dict(sorted(failures.items())),
        "trace": dict(sorted(Counter(str(r.get("trace")) for r in rows).items())),
        "attention_pruned": sum(bool(r.get("attention_pruned")) for r in rows),
        "over_budget": sum(r.get("within_budget") is False for r in rows),
        "tp_ok": sum(bool(r.get("tp_ok")) for r in rows),
    }


def summary_text(s: Row) -> str:
    fails = ", ".join(f"{k} {v}" for k, v in s["s2h_failures"].items()) or "none"
    trace = ", ".join(f"{k} {v}" for k, v in s["trace"].items())
    return (f"s2h-fx: {s['s2h_ok']}/{s['models']} exported == hard network "
            f"(failures: {fails}; over budget: {s['over_budget']}); traced: {trace}; "
            f"attention pruned on {s['attention_pruned']}\n"
            f"Torch-Pruning: {s['tp_ok']}/{s['models']} pruned and ran")


def summary_record(rows: list[Row], args: argparse.Namespace) -> Row:
    import platform

    import timm
    import torch_pruning as tp

    import s2h_fx

    return {"summary": True, **summary(rows), "budget": args.budget,
            "input_size": args.input_size, "timeout_s": args.timeout, "jobs": args.jobs,
            "sample": args.sample, "seed": args.seed, "torch": torch.__version__,
            "timm": timm.__version__, "torch_pruning": tp.__version__,
            "s2h_fx": s2h_fx.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "line": summary_text(summary(rows))}


# ---- command line -------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.5, help="FLOPs fraction to keep")
    p.add_argument("--models", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--sample", action="store_true",
                   help="one model per timm module, the smallest (see sample_models)")
    p.add_argument("--input-size", type=zoo.parse_size, default=None,
                   help="C,H,W for every model (default: each model's pretrained_cfg input_size)")
    p.add_argument("--out", default="timm_zoo.jsonl", help="JSON lines output")
    p.add_argument("--jobs", type=int, default=1, help="models run in parallel")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per model (default: cpu_count // jobs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp-trials", type=_at_least_one, default=zoo.TP_TRIALS,
                   help="bisection trials for Torch-Pruning's pruning_ratio (at least 1)")
    p.add_argument("--resume", action="store_true",
                   help="keep the model rows already in --out and run only the others")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)       # subprocess mode
    p.add_argument("--row-file", default=None, help=argparse.SUPPRESS)  # subprocess mode
    return p.parse_args(argv)


def model_names(args: argparse.Namespace) -> list[str]:
    if args.models:
        names = args.models.split(",")
        unknown = sorted(set(names) - set(all_models()))
        if unknown:
            raise SystemExit(f"unknown timm models: {', '.join(unknown)}")
        return names
    return sample_models() if args.sample else all_models()


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        zoo.TP_TRIALS = args.tp_trials
        record_traces()
        return zoo.run_one(args, build_fn=build, default_size=default_input_size,
                           inspect=inspect_pruner)
    args.child_args = ["--tp-trials", str(args.tp_trials)]
    names = model_names(args)
    done = previous_rows(args.out, names) if args.resume else {}
    t0 = time.perf_counter()
    with open(args.out, "w") as out:
        def write(row: Row) -> None:
            record = row if row.get("summary") else finish_row(row)
            out.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
            out.flush()

        for row in done.values():
            write(row)
        new = sweep([n for n in names if n not in done], args, on_row=write, script=__file__)
        by_name = {**{r["model"]: r for r in new}, **done}
        rows = [finish_row(by_name[n]) for n in names]
        write(summary_record(rows, args))
    print(format_table(rows))
    print()
    print(zoo.format_failures(rows))
    print(summary_text(summary(rows)))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The soft-hard gap: a small-scale version of S2HPruner's ablations, on digits.

scikit-learn's digits (1437 train / 360 val images, upsampled to 32x32, three
channels), torchvision resnet18 (10 classes, ``weights=None``), one FLOPs budget
at a time. Every method starts from the same initial weights (same seed), sees
the same batches in the same order, and uses the same weight optimiser (SGD,
momentum 0.9, weight decay 5e-4, cosine schedule) and the same mask optimiser
(``pruner.mask_step()``, masks initialised at full width):

- ``s2h``: the decoupled S2H step: soft and hard branches, L + R + G_h + G_s,
  theta <- d(L + G_h), u <- d(L + G_s + R).
- ``hard_st``: hard-only straight-through: only the masked full-width graph is
  run, every mask in ``straight_through`` mode (forward: the binary keep of the
  current hard width, i.e. the binary-mask emulation of the hard network;
  backward: the relaxed-mask gradient). Loss CE + R; theta and u both from it.
- ``soft_only``: only the soft (relaxed-mask) network: CE + R, no hard branch,
  no distillation; the masks are discretised at the end.
- ``no_decouple``: S2H with ``decoupled=False`` in ``losses()`` and
  ``backward()``: both KL terms reach both theta and u.

Every method trains through the library's one training loop
(``s2h_fx.trainer.fit(..., method=METHOD, finish=False)``). After training, every
method gets the same finishing steps, ``s2h_fx.trainer.finish_training(pruner,
train_loader, 20)``: ``sync_from_masks(); project(); recalibrate_bn(train_loader,
20); eval()``.
Reported per (budget, method): hard and soft val accuracy, their difference
(soft - hard), the mean Jensen-Shannon divergence (nats, natural log; at most
ln 2 = 0.693) between the soft and hard output distributions over the val set,
the exported network's FLOPs over the dense network's (``torch.utils.flop_counter``
on one 1x3x32x32 input), the mask FLOPs ratio training itself ended at (before
the projection) and whether the projection had to shrink it, and wall seconds
(training + finishing). The soft network is evaluated as training left it
(relaxed masks, its own BatchNorm running statistics) before the finishing steps,
and again after them (``soft_acc_after_finish``: ``project()`` may set one-hot
masks; the hard network's BatchNorm statistics are its own, so
``recalibrate_bn`` does not touch the soft network's).

    python benchmarks/gap.py --out gap.jsonl
    python benchmarks/gap.py --budgets 0.35 --threads 1 --seed 1 --out gap_0.35_s1.jsonl
    python benchmarks/gap.py --budgets 0.35 --methods s2h,hard_st --epochs 1
    python benchmarks/gap.py --table gap*.jsonl    # reprint; mean +- sd over seeds

Defaults: 10 epochs, batch 32 (45 steps an epoch), mask lr 0.1, seed 0. With one
thread per run on an idle 2-core machine (two runs side by side, one per budget),
10 epochs of resnet18 at 32x32 took about 270-320 s for ``s2h``, 190 s for
``hard_st``, 160 s for ``soft_only`` and 220-260 s for ``no_decouple``: a
(budget, seed) row set in about 15 minutes. ``--table a.jsonl b.jsonl ...``
reprints the rows of several runs and, where a (budget, method) was run with
several seeds, their mean and sample standard deviation. The mask lr is twice
the library's default (0.05): from full width the mask optimiser needs about 85
resource-dominated steps to reach budget 0.15 at 0.05, about 35 at 0.1, and the
shorter runs this table was first made with (1-3 epochs) would otherwise have
let the final projection choose the architecture. ``soft_acc_batch_bn``
is the soft network's accuracy with BatchNorm on batch statistics (running
buffers restored): it separates stale running statistics from a bad soft network.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

METHODS = ("s2h", "hard_st", "soft_only", "no_decouple")
Row = dict[str, Any]


# ---- data ---------------------------------------------------------------------

def digits_loaders(batch_size: int, seed: int, max_train: int | None = None,
                   max_val: int | None = None) -> tuple[Any, Any]:
    """``s2h_fx.data.digits_loaders`` at 32x32 (a fresh, seeded shuffle per call)."""
    from s2h_fx.data import digits_loaders as library_loaders

    return library_loaders(batch_size=batch_size, size=32, seed=seed,
                           max_train=max_train, max_val=max_val)


# ---- measuring ------------------------------------------------------------------

def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    """``s2h_fx.measure.count_flops``: flop_counter FLOPs of one forward in eval mode."""
    from s2h_fx.measure import count_flops as library_count_flops

    return library_count_flops(module, x)


def js_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence (nats) between softmax(a) and softmax(b)."""
    la, lb = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    lm = torch.logsumexp(torch.stack([la, lb]), 0) - math.log(2.0)
    kl_a = (la.exp() * (la - lm)).sum(-1)
    kl_b = (lb.exp() * (lb - lm)).sum(-1)
    return (0.5 * (kl_a + kl_b)).clamp_min(0.0)


@torch.no_grad()
def val_logits(forward: Any, loader: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``forward`` over the whole loader."""
    outs, labels = [], []
    for x, y in loader:
        outs.append(forward(x))
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


@torch.no_grad()
def batch_stat_logits(pruner: Any, loader: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft logits with BatchNorm on batch statistics (train mode), buffers restored:
    tells a soft network hurt by stale running statistics from a bad one."""
    gm = pruner.graph_module
    saved = {k: v.clone() for k, v in gm.state_dict().items() if "running" in k
             or "num_batches" in k}
    was = gm.training
    gm.train()
    try:
        return val_logits(gm, loader)
    finally:
        gm.load_state_dict(saved, strict=False)
        gm.train(was)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).double().mean())


# ---- training -------------------------------------------------------------------

def train_method(pruner: Any, method: str, train_loader: Any, epochs: int, lr: float) -> Row:
    """Train ``pruner`` with ``method`` through the library's training loop
    (``s2h_fx.trainer.fit(..., method=method, finish=False)``: the same weight
    optimiser, schedule and mask step for every method, masks from full width);
    return its training trace (not yet finished)."""
    from s2h_fx.trainer import METHODS as LIBRARY_METHODS
    from s2h_fx.trainer import fit

    if method not in METHODS or method not in LIBRARY_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    history = fit(pruner, train_loader, epochs, lr=lr, momentum=0.9, weight_decay=5e-4,
                  device="cpu", progress=False, method=method, finish=False)
    # train_acc: of the branch the method trains as "hard" (for hard_st and soft_only,
    # their single branch)
    trace = [{**rec.losses, "train_acc": rec.hard_acc, "mask_flops": rec.flops_ratio,
              "skipped": rec.skipped} for rec in history]
    return {"trace": trace}


def run_one(method: str, budget: float, args: argparse.Namespace, dense_flops: int) -> Row:
    import s2h_fx
    from s2h_fx.config import S2HConfig
    from s2h_fx.trainer import finish_training

    train_loader, val_loader = digits_loaders(args.batch_size, args.seed, args.max_train,
                                              args.max_val)
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=10, weights=None)
    x1 = torch.zeros(1, 3, 32, 32)
    # the search alone: no settling epochs (they train the hard network by itself,
    # which would leave the soft branch behind and say nothing about the methods)
    config = S2HConfig(settle_epochs=0, **({"mask_lr": args.mask_lr} if args.mask_lr else {}))
    pruner = s2h_fx.prune_graph(model, budget, example_inputs=(torch.zeros(2, 3, 32, 32),),
                                config=config)
    t0 = time.perf_counter()
    row = train_method(pruner, method, train_loader, args.epochs, args.lr)
    trained_flops = float(pruner.flops_ratio(pruner.mask_widths()))
    train_seconds = time.perf_counter() - t0
    # The soft network as training left it (relaxed masks, its own BN statistics);
    # project() may change the masks (the hard network keeps its own BN statistics).
    pruner.eval()
    soft, y = val_logits(pruner.soft_forward, val_loader)
    soft_batch_bn, _ = batch_stat_logits(pruner, val_loader)
    t1 = time.perf_counter()
    projected = finish_training(pruner, train_loader, 20)
    seconds = train_seconds + time.perf_counter() - t1
    hard, _ = val_logits(pruner, val_loader)
    soft_after, _ = val_logits(pruner.soft_forward, val_loader)
    exported = pruner.export()
    xv = next(iter(val_loader))[0]
    with torch.no_grad():
        ref = pruner(xv)
        err = float((exported(xv) - ref).abs().max() / ref.abs().max())
    soft_acc, hard_acc = accuracy(soft, y), accuracy(hard, y)
    row.update({
        "budget": budget, "method": method, "epochs": args.epochs, "seed": args.seed,
        "batch_size": args.batch_size, "mask_lr": pruner.s2h.mask_lr,
        "hard_acc": hard_acc, "soft_acc": soft_acc, "gap": soft_acc - hard_acc,
        "js": float(js_divergence(soft, hard).mean()),
        "soft_acc_batch_bn": accuracy(soft_batch_bn, y),
        "soft_acc_after_finish": accuracy(soft_after, y),
        "js_after_finish": float(js_divergence(soft_after, hard).mean()),
        "flops_ratio": count_flops(exported, x1) / dense_flops,
        "library_flops_ratio": float(pruner.flops_ratio()),
        "trained_flops_ratio": trained_flops, "projected": projected,
        "export_rel_err": err, "seconds": seconds,
    })
    return row


# ---- table ----------------------------------------------------------------------

COLUMNS = [("budget", "budget", "{:.2f}"), ("method", "method", "{}"),
           ("hard_acc", "hard acc", "{:.4f}"), ("soft_acc", "soft acc", "{:.4f}"),
           ("soft_acc_batch_bn", "soft acc (batch BN)", "{:.4f}"),
           ("gap", "gap (s-h)", "{:+.4f}"), ("js", "JS (nats)", "{:.4f}"),
           ("flops_ratio", "exported FLOPs", "{:.4f}"),
           ("trained_flops_ratio", "trained FLOPs", "{:.4f}"), ("projected", "projected", "{}"),
           ("seconds", "wall s", "{:.0f}")]


def layout(cells: list[list[str]]) -> str:
    """Columns padded to width (the second, the method, left-aligned), a rule under
    the first line."""
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    cells += [[fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in rows]
    return layout(cells)


MEAN_COLUMNS = [("hard_acc", "hard acc"), ("soft_acc", "soft acc"), ("gap", "gap (s-h)"),
                ("js", "JS (nats)"), ("flops_ratio", "exported FLOPs")]


def mean_table(rows: list[Row]) -> str | None:
    """Mean and sample standard deviation over seeds per (budget, method), or None
    when no (budget, method) was run with more than one seed."""
    cells_of: dict[tuple[float, str], list[Row]] = {}
    for r in rows:
        cells_of.setdefault((r["budget"], r["method"]), []).append(r)
    if all(len({r.get("seed") for r in rs}) < 2 for rs in cells_of.values()):
        return None
    lines = [["budget", "method", "seeds", "epochs"] + [t for _, t in MEAN_COLUMNS]]
    for (budget, method), rs in sorted(cells_of.items(), key=lambda kv: (kv[0][0], METHODS.index(
            kv[0][1]) if kv[0][1] in METHODS else 99)):
        line = [f"{budget:.2f}", method, str(len(rs)),
                ",".join(sorted({str(r["epochs"]) for r in rs}))]
        for key, _ in MEAN_COLUMNS:
            vals = [float(r[key]) for r in rs]
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            line.append(f"{mean:.4f} +- {sd:.4f}")
        lines.append(line)
    return layout(lines)


def print_tables(rows: list[Row]) -> None:
    print(table(rows))
    means = mean_table(rows)
    if means is not None:
        print("\nmean +- sample standard deviation over seeds:")
        print(means)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="0.15,0.35", help="comma-separated FLOPs budgets")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs, every method")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05, help="weight learning rate (cosine)")
    ap.add_argument("--mask-lr", type=float, default=0.1,
                    help="mask optimiser step (S2HConfig.mask_lr; the library's default is "
                         "0.05, which needs ~85 steps to reach budget 0.15 from full width)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=None, help="seeded train subset size")
    ap.add_argument("--max-val", type=int, default=None, help="seeded val subset size")
    ap.add_argument("--out", type=Path, default=None, help="write JSON lines here")
    ap.add_argument("--table", type=Path, nargs="+", default=None,
                    help="only print the table of earlier runs' JSON lines (several files, "
                         "e.g. one per seed: also mean +- sd over seeds)")
    args = ap.parse_args(argv)
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        print_tables([json.loads(line) for path in args.table
                      for line in path.read_text().splitlines() if line])
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dense_flops = count_flops(torchvision.models.resnet18(num_classes=10, weights=None),
                              torch.zeros(1, 3, 32, 32))
    load = _loadavg()
    print(f"digits 32x32, resnet18, {args.epochs} epoch(s), batch {args.batch_size}, "
          f"lr {args.lr}, mask lr {args.mask_lr}, seed {args.seed}, {args.threads} threads, torch {torch.__version__}, "
          f"load average at start {load}", flush=True)
    rows: list[Row] = []
    out = args.out.open("w") if args.out else None
    try:
        for budget in args.budgets:
            for method in args.methods:
                row = run_one(method, budget, args, dense_flops)
                row["load_start"], row["load_end"] = load, _loadavg()
                load = row["load_end"]
                rows.append(row)
                print(f"budget {budget:.2f} {method}: hard {row['hard_acc']:.4f} soft "
                      f"{row['soft_acc']:.4f} JS {row['js']:.4f} FLOPs {row['flops_ratio']:.4f} "
                      f"({row['seconds']:.0f} s, load {row['load_end']})", flush=True)
                if out is not None:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    finally:
        if out is not None:
            out.close()
    print()
    print_tables(rows)
    print(f"\n{platform.processor() or platform.machine()}, load average at end {_loadavg()}")
    return 0


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())

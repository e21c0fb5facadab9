"""``s2h-fx demo``: S2H pruning of torchvision's resnet18 on scikit-learn's digits,
on CPU, with nothing to download.

The digits (1797 real 8x8 images) are upsampled to 32x32 RGB. A randomly
initialised resnet18 (10 classes) is trained twice from the same weights for
the same number of epochs with the same weight optimiser (SGD, momentum 0.9,
cosine schedule):

* **dense**: plain cross-entropy, the baseline;
* **S2H**: :meth:`s2h_fx.Pruner.fit`, the soft and hard branches and the masks
  trained together under the FLOPs budget (0.3 by default).

Then a table compares dense, soft, hard and the exported (physically pruned)
network: validation accuracy, GFLOPs (``torch.utils.flop_counter`` at batch 1),
parameters, CPU latency (median over interleaved runs at batch 1, measured side
by side in the same process) and the measured speed-up over dense. It writes
``s2h_demo.json`` (the table and the training history) and ``s2h_demo.png``
(accuracy and the hard FLOPs ratio over training) to ``out_dir``.

The helpers :func:`compare` and :func:`format_table` serve ``s2h-fx prune`` too.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s2h_fx.measure import count_flops
from s2h_fx.pruner import Pruner, prune_graph
from s2h_fx.trainer import EpochRecord, evaluate, fit_dense

DEFAULT_EPOCHS = 8


@dataclass
class Row:
    """One line of the comparison table."""

    name: str
    val_acc: float
    gflops: float
    flops_ratio: float
    params_m: float
    latency_ms: float
    speedup: float
    note: str = ""  # printed under the table, the row's name marked with *


# ---- training the dense baseline ----------------------------------------------
def train_dense(
    model: nn.Module, train_loader: Iterable[Any], epochs: int, *, val_loader: Iterable[Any]
    | None = None, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
    device: str | torch.device = "cpu", progress: bool = False,
) -> list[dict[str, float]]:
    """Plain cross-entropy training through the loop :meth:`Pruner.fit` uses (SGD +
    momentum, the same cosine schedule per step, the same non-finite guard):
    :func:`s2h_fx.trainer.fit_dense`. Returns per-epoch records (train loss and
    accuracy, val accuracy)."""
    return fit_dense(model, train_loader, epochs, val_loader=val_loader, lr=lr,
                     momentum=momentum, weight_decay=weight_decay, device=device,
                     progress=progress)


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[Any],
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` (put in eval mode if it is a module) on ``loader``."""
    if isinstance(model, nn.Module):
        was = model.training
        model.eval()
    ok = seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        ok += int((model(x).argmax(-1) == y).sum())
        seen += y.numel()
    if isinstance(model, nn.Module):
        model.train(was)
    return ok / max(seen, 1)


# ---- measuring ------------------------------------------------------------------
def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def latencies(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, runs: int = 50,
              warmup: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each function, measured side by side: the
    functions take turns (round robin), so a change in machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(runs, 1)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def compare(
    dense: nn.Module, pruner: Pruner, pruned: nn.Module, val_loader: Iterable[Any],
    example: torch.Tensor, *, dense_acc: float | None = None, latency_runs: int = 50,
    device: str | torch.device = "cpu", settled: bool = False,
) -> list[Row]:
    """The dense / soft / hard / exported rows. Accuracy on ``val_loader`` (on
    ``device``); FLOPs, params and CPU latency on ``example`` (batch 1 on CPU).

    ``dense_acc``: the dense model's accuracy when already measured. ``settled``:
    the run ended with settling epochs, which train the hard network alone, so the
    soft row is the soft network as the search left it (its note says so)."""
    dense.eval()
    pruner.eval()
    pruned.eval()
    if dense_acc is None:
        dense_acc = accuracy(dense, val_loader, device)
    soft_acc, hard_acc = evaluate(pruner, val_loader, torch.device(device))
    pruned_acc = accuracy(pruned, val_loader, device)

    cpu = torch.device("cpu")
    dense, pruner, pruned = dense.to(cpu), pruner.to(cpu), pruned.to(cpu)
    x = example[:1].to(cpu)
    fns: dict[str, Callable[[torch.Tensor], Any]] = {
        "dense": dense, "soft": pruner.soft_forward, "hard": pruner, "exported": pruned}
    flops = {name: count_flops(fn, x) for name, fn in fns.items()}
    weights = count_params(dense)
    soft_params = sum(p.numel() for p in pruner.weight_parameters())
    pruned_params = count_params(pruned)  # the hard network's sliced weights are these
    params = {"dense": weights, "soft": soft_params, "hard": pruned_params,
              "exported": pruned_params}
    ms = latencies(fns, x, latency_runs)
    accs = {"dense": dense_acc, "soft": soft_acc, "hard": hard_acc, "exported": pruned_acc}
    notes = {"soft": SOFT_AFTER_SETTLING} if settled else {}
    return [Row(name, accs[name], flops[name] / 1e9, flops[name] / flops["dense"],
                params[name] / 1e6, ms[name], ms["dense"] / ms[name], notes.get(name, ""))
            for name in fns]


SOFT_AFTER_SETTLING = ("soft: the soft network as the search phase left it; the settling "
                       "epochs trained the hard network alone (the exported one), not it")


def format_table(rows: list[Row], title: str = "") -> str:
    head = (f"{'network':10}{'val acc':>9}{'GFLOPs':>10}{'FLOPs':>8}{'params M':>10}"
            f"{'CPU ms':>9}{'speed-up':>10}")
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        name = r.name + ("*" if r.note else "")
        lines.append(f"{name:10}{r.val_acc:9.4f}{r.gflops:10.4f}{r.flops_ratio:8.3f}"
                     f"{r.params_m:10.3f}{r.latency_ms:9.2f}{r.speedup:9.2f}x")
    lines += [f"* {r.note}" for r in rows if r.note]
    return "\n".join(lines)


# ---- the plot ----------------------------------------------------------------------
def plot_history(history: list[EpochRecord], budget: float, path: str | Path, *,
                 dense_history: list[dict[str, float]] | None = None,
                 final_ratio: float | None = None, final_acc: float | None = None,
                 title: str = "") -> Path:
    """Accuracy (per step on the training batches, per epoch on validation) and the
    hard FLOPs ratio per step with the budget line; written with matplotlib's Agg.

    ``final_ratio``/``final_acc``: the exported network's FLOPs ratio and validation
    accuracy (after fit's BatchNorm re-estimation), marked at the last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [s for rec in history for s in rec.steps]
    ends = []
    n = 0
    for rec in history:
        n += len(rec.steps)
        ends.append(n)
    x = range(1, len(steps) + 1)
    fig, (ax_acc, ax_flops) = plt.subplots(1, 2, figsize=(12, 4.5))

    # settling steps of the hard network alone have no soft branch: a gap in the line
    ax_acc.plot(x, [s.get("soft_acc", math.nan) for s in steps], color="tab:blue", alpha=0.45,
                lw=1, label="soft, train (running, per epoch)")
    ax_acc.plot(x, [s["hard_acc"] for s in steps], color="tab:orange", alpha=0.45, lw=1,
                label="hard, train (running, per epoch)")
    val_soft = [(e, r.val_soft_acc) for e, r in zip(ends, history)
                if r.val_soft_acc is not None]
    val_hard = [(e, r.val_hard_acc) for e, r in zip(ends, history) if r.val_hard_acc is not None]
    if val_soft:
        ax_acc.plot(*zip(*val_soft), "o-", color="tab:blue", label="soft, val")
    if val_hard:
        ax_acc.plot(*zip(*val_hard), "s-", color="tab:orange",
                    label="hard, val (BN statistics as in training)")
    if dense_history:
        steps_per_epoch = ends[0] if ends else 1
        dense_val = [((i + 1) * steps_per_epoch, r["val_acc"])
                     for i, r in enumerate(dense_history) if "val_acc" in r]
        if dense_val:
            ax_acc.plot(*zip(*dense_val), "^--", color="gray", label="dense baseline, val")
    if final_acc is not None and steps:
        ax_acc.plot([len(steps)], [final_acc], "*", color="black", ms=12,
                    label=f"exported, val {final_acc:.3f} (BN re-estimated)")
    ax_acc.set_xlabel("training step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc="best", framealpha=0.85)
    ax_acc.set_title("accuracy")

    ax_flops.plot(x, [s["flops"] for s in steps], color="tab:green", label="hard FLOPs ratio")
    ax_flops.axhline(budget, color="tab:red", ls="--", label=f"budget {budget:g}")
    if final_ratio is not None and steps:
        ax_flops.plot([len(steps)], [final_ratio], "*", color="black", ms=12,
                      label=f"exported {final_ratio:.3f}")
    for e in ends[:-1]:
        ax_flops.axvline(e, color="gray", lw=0.5, alpha=0.5)
    ax_flops.set_xlabel("training step")
    ax_flops.set_ylabel("FLOPs / dense FLOPs")
    ax_flops.set_ylim(0, 1.05)
    ax_flops.grid(alpha=0.3)
    ax_flops.legend(fontsize=8)
    ax_flops.set_title("hard network's FLOPs over training")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def last_epoch_note(history: list[EpochRecord]) -> str:
    """The validation accuracies fit logged at the end of its last epoch, before it
    re-estimated the hard network's BatchNorm statistics (the table's rows are after)."""
    last = history[-1] if history else None
    if last is None or last.val_soft_acc is None or last.val_hard_acc is None:
        return ""
    if last.settling:  # the soft branch stopped training when the settling began
        return (f"end of the last S2H epoch (settling), before fit re-estimated BatchNorm "
                f"statistics for the hard network: val hard {last.val_hard_acc:.4f}")
    return (f"end of the last S2H epoch, before fit re-estimated BatchNorm statistics for the "
            f"hard network: val soft {last.val_soft_acc:.4f}, hard {last.val_hard_acc:.4f}")


def history_json(history: list[EpochRecord]) -> list[dict[str, Any]]:
    """The history as plain JSON (no NaN: a settling epoch's soft accuracy is null)."""
    out = []
    for rec in history:
        d = asdict(rec)
        d["val_gap"] = rec.val_gap
        if isinstance(d["soft_acc"], float) and math.isnan(d["soft_acc"]):
            d["soft_acc"] = None
        out.append(d)
    return out


# ---- the demo ------------------------------------------------------------------------
def run_demo(
    epochs: int = DEFAULT_EPOCHS, budget: float = 0.3, out_dir: str | Path = "s2h_demo", *,
    batch_size: int = 64, lr: float = 0.05, size: int = 32, seed: int = 0,
    max_train: int | None = None, max_val: int | None = None, latency_runs: int = 50,
    progress: bool = True, device: str = "cpu", print_fn: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Train a dense resnet18 and an S2H-pruned one on digits for ``epochs`` each, print
    the comparison table, write ``s2h_demo.json`` and ``s2h_demo.png`` in ``out_dir``.

    Returns ``{"rows": [Row, ...], "history": [EpochRecord, ...], "dense_history": [...],
    "json": Path, "plot": Path, "wall_s": {...}}``. ``max_train``/``max_val``
    (seeded subsets), ``size`` and ``latency_runs`` make small runs for tests."""
    import torchvision

    from s2h_fx.config import PruneConfig
    from s2h_fx.data import digits_loaders

    PruneConfig(budget)  # a bad budget fails before the slow steps
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    start = time.perf_counter()

    train_loader, val_loader = digits_loaders(batch_size, size, seed, max_train=max_train,
                                              max_val=max_val)
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    dense = copy.deepcopy(model)  # the same initial weights for both runs
    example = next(iter(val_loader))[0][:1]
    n_train = len(train_loader.dataset)  # type: ignore[arg-type]
    n_val = len(val_loader.dataset)  # type: ignore[arg-type]
    print_fn(f"s2h-fx demo: resnet18 (random init, 10 classes) on scikit-learn digits "
             f"upsampled to {size}x{size} ({n_train} train / {n_val} val images), budget "
             f"{budget:g}, {epochs} epochs of batch {batch_size}, on {device}")

    t = time.perf_counter()
    torch.manual_seed(seed)
    dense_history = train_dense(dense, train_loader, epochs, val_loader=val_loader, lr=lr,
                                device=device, progress=progress)
    wall["dense_train"] = time.perf_counter() - t
    dense_acc = dense_history[-1]["val_acc"]
    print_fn(f"dense: {epochs} epochs in {wall['dense_train']:.1f} s, val accuracy "
             f"{dense_acc:.4f}")

    t = time.perf_counter()
    pruner = prune_graph(model, budget, example_inputs=(example,))
    one_shot_ratio = float(pruner.flops_ratio())
    torch.manual_seed(seed)
    history = pruner.fit(train_loader, epochs, val_loader=val_loader, lr=lr, device=device,
                         progress=progress)
    wall["s2h_train"] = time.perf_counter() - t
    final_ratio = float(pruner.flops_ratio())
    for rec in history:
        if rec.settling:  # the hard network alone, architecture fixed
            print_fn(f"S2H epoch {rec.epoch} (settling): task {rec.losses['task']:.3f}, hard "
                     f"FLOPs {rec.flops_ratio:.3f}, val hard {rec.val_hard_acc:.4f}")
            continue
        print_fn(f"S2H epoch {rec.epoch}: task {rec.losses['task']:.3f} resource "
                 f"{rec.losses['resource']:.4f} kd_hard {rec.losses['kd_hard']:.3f} kd_soft "
                 f"{rec.losses['kd_soft']:.3f}, hard FLOPs {rec.flops_ratio:.3f}, val soft "
                 f"{rec.val_soft_acc:.4f} hard {rec.val_hard_acc:.4f}")
    print_fn(f"S2H: {epochs} epochs in {wall['s2h_train']:.1f} s; hard FLOPs ratio "
             f"{final_ratio:.4f} (budget {budget:g}; one-shot start {one_shot_ratio:.4f})")

    t = time.perf_counter()
    pruned = pruner.export()
    rows = compare(dense, pruner, pruned, val_loader, example, dense_acc=dense_acc,
                   latency_runs=latency_runs, device=device,
                   settled=any(r.settling for r in history))
    wall["measure"] = time.perf_counter() - t
    table = format_table(rows, f"resnet18 on digits {size}x{size}, budget {budget:g}, "
                               f"{epochs} epochs each (latency: batch 1, median of "
                               f"{latency_runs}, {torch.get_num_threads()} threads)")
    print_fn(table)
    print_fn(last_epoch_note(history))

    plot = plot_history(history, budget, out / "s2h_demo.png", dense_history=dense_history,
                        final_ratio=rows[-1].flops_ratio, final_acc=rows[-1].val_acc,
                        title=f"S2H on digits, resnet18, budget {budget:g}")
    wall["total"] = time.perf_counter() - start
    result_json = {
        "model": "resnet18", "dataset": "sklearn digits", "input": [1, 3, size, size],
        "budget": budget, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "train_images": n_train, "val_images": n_val, "threads": torch.get_num_threads(),
        "latency_runs": latency_runs, "one_shot_flops_ratio": one_shot_ratio,
        "rows": [asdict(r) for r in rows], "dense_history": dense_history,
        "history": history_json(history), "wall_s": wall,
    }
    json_path = out / "s2h_demo.json"
    json_path.write_text(json.dumps(result_json, indent=1, allow_nan=False))
    print_fn(f"wrote {json_path} and {plot} ({wall['total']:.0f} s in all)")
    return {"rows": rows, "history": history, "dense_history": dense_history,
            "json": json_path, "plot": plot, "wall_s": wall, "pruner": pruner,
            "pruned": pruned}

"""Training throughput of ``fit`` next to a plain dense training loop: images per
second, same model, batches, optimiser and loop, in one run.

- dense: ``s2h_fx.trainer.fit_dense`` (cross-entropy, SGD, the loop ``fit`` uses);
- S2H fit: ``prune_graph`` + ``fit`` with the default phases (descent, search,
  settling: the last 60 % of the epochs train the hard network alone, so this is
  what a whole run averages);
- S2H search: ``fit`` with every epoch in the search phase (both branches, the
  decoupled backward, the mask step and re-ranking every step): the slowest phase.

The batches are random tensors made once on the device (no data loading in the
timing); ``--steps`` batches per epoch, ``--epochs`` epochs per run, after one
untimed warm-up epoch of each on a throwaway copy (CUDA kernels chosen, caches
filled); ``--repeat`` runs of each (a fresh copy every run), interleaved in an
order rotated every repetition; medians. The time of a run is the wall time of
the ``fit`` / ``fit_dense`` call, synchronised on CUDA, without the pruner's
preparation and without ``fit``'s finish (BatchNorm re-estimation, projection). ``--no-keep-heap``: both loops without
``keep_heap`` (on the CPU). ``--amp`` is ``fit``'s own: float16 with a GradScaler
on CUDA (the default there), bfloat16 autocast on the CPU.

    python benchmarks/fit_speed.py --model resnet18 --threads 1
    python benchmarks/fit_speed.py --model resnet50 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import _sync, device_defaults, make_model  # noqa: E402  (benchmarks/ is not a package)

Row = dict[str, Any]


def _timed(device: torch.device, fn: Any) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> Row:
    import s2h_fx
    from s2h_fx.config import S2HConfig
    from s2h_fx.trainer import fit, fit_dense

    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, classes = make_model(args.model, args.input_size[0])
    gen = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randn(args.batch_size, *args.input_size, generator=gen).to(dev),
                torch.randint(0, classes, (args.batch_size,), generator=gen).to(dev))
               for _ in range(args.steps)]
    example = (batches[0][0][:2].cpu(),)
    common = {"device": dev, "progress": False, "steps_per_epoch": args.steps, "amp": args.amp,
              "keep_heap": args.keep_heap}
    search_only = S2HConfig(descent_epochs=0, settle_epochs=0)

    def dense(epochs: int) -> float:
        net = copy.deepcopy(model)
        return _timed(dev, lambda: fit_dense(net, batches, epochs, **common))

    def s2h(epochs: int, config: S2HConfig | None = None) -> float:
        pruner = s2h_fx.prune_graph(copy.deepcopy(model), args.budget, example_inputs=example,
                                    config=config)
        return _timed(dev, lambda: fit(pruner, batches, epochs, finish=False, **common))

    runs = {"dense": lambda e: dense(e), "s2h fit": lambda e: s2h(e),
            "s2h search": lambda e: s2h(e, search_only)}
    names = list(runs)
    for run in runs.values():  # warm-up: one epoch of each, thrown away
        run(1)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeat):  # interleaved, the order rotated each repetition
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(runs[name](args.epochs))
    seconds = {n: statistics.median(t) for n, t in times.items()}
    images = args.epochs * args.steps * args.batch_size
    ips = {name: images / s for name, s in seconds.items()}
    return {
        "model": args.model, "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "amp": args.amp, "keep_heap": args.keep_heap, "input_size": list(args.input_size),
        "batch_size": args.batch_size,
        "budget": args.budget, "epochs": args.epochs, "steps": args.steps,
        "repeat": args.repeat, "seconds": seconds, "runs": times, "images_per_s": ips,
        "s2h_fit_over_dense": ips["s2h fit"] / ips["dense"],
        "s2h_search_over_dense": ips["s2h search"] / ips["dense"],
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }


def report(row: Row) -> str:
    size = "x".join(str(s) for s in row["input_size"])
    where = row["gpu"] or f"{row['device']}, {row['threads']} threads"
    heap = "" if row["gpu"] else (", heap kept" if row["keep_heap"] else ", --no-keep-heap")
    lines = [f"{row['model']} on {where}{', amp' if row['amp'] else ''}{heap}: batch "
             f"{row['batch_size']}, input {size}, budget {row['budget']}, {row['epochs']} "
             f"epochs of {row['steps']} steps per run, median of {row['repeat']}, torch "
             f"{row['torch']}",
             f"  {'':12s} {'images/s':>10s} {'vs dense':>9s}"]
    for name, ips in row["images_per_s"].items():
        lines.append(f"  {name:12s} {ips:10.1f} {ips / row['images_per_s']['dense']:8.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18",
                    help="torchvision model name ('toy': a small conv net)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    ap.add_argument("--input-size", default=None,
                    help="C,H,W; default 3,64,64 on CPU, 3,224,224 on CUDA")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="fit's amp (default: on for CUDA, off on CPU)")
    ap.add_argument("--no-keep-heap", dest="keep_heap", action="store_false",
                    help="on CPU: fit and fit_dense with keep_heap=False (glibc returns freed "
                         "memory to the kernel during the epochs)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs of each")
    ap.add_argument("--steps", type=int, default=10, help="batches per epoch")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each, interleaved (medians)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="append a JSON line here")
    args = ap.parse_args(argv)
    if min(args.epochs, args.steps, args.repeat) < 1:
        ap.error("--epochs, --steps and --repeat must be >= 1")
    device_defaults(ap, args)
    args.amp = args.device.startswith("cuda") if args.amp is None else args.amp
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    # a throughput benchmark: the short runs' projection notices are not its subject
    quiet = logging.getLogger("s2h_fx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        row = measure(args)
    finally:
        quiet.setLevel(level)
    print(report(row), flush=True)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

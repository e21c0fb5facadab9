"""The ``s2h-fx`` command line: inspect a torchvision or timm model's channel groups, or prune and export it.

    s2h-fx demo                                   # S2H on resnet18 + sklearn digits, CPU, no download
    s2h-fx inspect resnet18 --input-size 3,224,224
    s2h-fx inspect timm:vit_small_patch16_224     # timm's models as timm:NAME ([timm] extra)
    s2h-fx export resnet18 --budget 0.5 -o resnet18_half.pt2      # one-shot widths, no training
    s2h-fx prune resnet18 --budget 0.3 --cifar10 ~/data -o r18.pt2  # S2H training on a dataset
    s2h-fx prune resnet18 --budget 0.3 --fashion-mnist -o r18.pt2   # Debian's Fashion-MNIST

``export`` writes ``.pt2`` with :func:`torch.export.save` (load it with
``torch.export.load(FILE).module()``; batch size is dynamic where the model
allows) or ``.pt``/``.pth`` as a pickled ``torch.fx.GraphModule`` (load it with
``torch.load(FILE, weights_only=False)``). Neither file refers to s2h-fx.
The file is written atomically: a failed run leaves no file behind.

Exit status: 0 on success, 1 when the pruned model disagrees with the pruner's
hard network (a bug in s2h-fx: please report it), 2 on a usage error or an
:class:`~s2h_fx.errors.S2HError`.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from s2h_fx.config import ATTENTION_MODES, ONE_SHOT_RULES, PruneConfig
from s2h_fx.data import FASHION_MNIST_ROOT
from s2h_fx.errors import InputError, S2HError
from s2h_fx.measure import count_flops
from s2h_fx.pruner import Pruner, prune_graph

log = logging.getLogger(__name__)

PROG = "s2h-fx"
SAVE_FORMATS = {".pt2": "torch.export program", ".pt": "pickled GraphModule",
                ".pth": "pickled GraphModule"}
MAX_REL_ERROR = 1e-4  # pruned(x) vs pruner(x); both compute the same float32 sums


MODEL_HELP = ("torchvision classification model name (resnet18), or a timm model as "
              "timm:NAME (timm:vit_small_patch16_224; needs the [timm] extra)")


class CliError(Exception):
    """A bad command-line value, reported as ``error: <message>`` with exit status 2."""


# ---- argument parsing ------------------------------------------------------

ATTENTION_HELP = ("prune each attention head's width, whole heads, both (whole heads and the "
                  "width of those kept), or (auto, the default) both where whole heads prune "
                  "no less than widths")
ONE_SHOT_HELP = ("how the one-shot widths (before training; the projection into the budget "
                 "after it) choose the channels to drop: per-cost (default: least L1 "
                 "importance per unit of cost saved; narrow residual streams go first) or "
                 "share (least importance against the rest of its own group, whatever it "
                 "costs; wider cuts of expansion layers)")
DIVISOR_HELP = ("widths are multiples of this where a group allows (default 8; for a latency "
                "budget its runtime's: 32 on CPU, 8 on a GPU)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _input_size(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 3,224,224, got {text!r}"
        ) from None


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help=MODEL_HELP)
    common.add_argument("--input-size", type=_input_size, default=None, metavar="C,H,W",
                        help="example input size without batch (default: the model's own; "
                             "3,224,224 for torchvision)")
    common.add_argument("--batch", type=_positive_int, default=1, help="example batch size (default 1)")
    common.add_argument("--divisor", type=_positive_int, default=None,
                        help=DIVISOR_HELP)
    common.add_argument("--attention", choices=ATTENTION_MODES, default="auto",
                        help=ATTENTION_HELP)
    common.add_argument("--one-shot", choices=ONE_SHOT_RULES, default="per-cost",
                        help=ONE_SHOT_HELP)
    common.add_argument("--strict", action="store_true",
                        help="fail on ops without a coupling rule instead of freezing their groups")
    common.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights and example input (default 0)")

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("inspect", parents=[common], help="print the channel groups of a model")
    export = sub.add_parser("export", parents=[common],
                            help="prune a model to a FLOPs budget and save it")
    export.add_argument("--budget", type=float, required=True,
                        help="fraction of the FLOPs (or --budget-kind) to keep, in (0, 1]")
    _budget_options(export, batch=False)
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                        help="where to save: FILE.pt2 (torch.export, recommended) or FILE.pt "
                             "(pickle; load with torch.load(FILE, weights_only=False))")
    _add_demo_parser(sub)
    _add_prune_parser(sub)
    from s2h_fx import bench

    bench.add_parser(sub)
    return parser


def _budget_options(p: argparse.ArgumentParser, batch: bool) -> None:
    p.add_argument("--budget-kind", default="flops", metavar="KIND",
                   help="what --budget counts: flops (default), params, or latency (measured "
                        "on --runtime at --batch; layer tables cached in ~/.cache/s2h-fx)")
    p.add_argument("--runtime", default=None,
                   help="the runtime of a latency budget: eager, compile, onnxruntime, tensorrt")
    if batch:
        p.add_argument("--batch", type=_positive_int, default=1,
                       help="batch size of a latency budget's timings (default 1)")


def _budget_of(args: argparse.Namespace) -> float | dict[str, Any]:
    """The budget that --budget, --budget-kind, --runtime and --batch describe, checked
    (an unknown kind, a latency budget without a runtime, or a runtime that cannot run
    here is a CliError: exit status 2)."""
    kind = getattr(args, "budget_kind", "flops")
    runtime = getattr(args, "runtime", None)
    budget: float | dict[str, Any] = args.budget
    if kind != "flops" or runtime is not None:
        budget = {kind: args.budget}
        if kind == "latency" or runtime is not None:
            budget.update(runtime=runtime, batch=args.batch)
            if getattr(args, "threads", None):
                budget["threads"] = args.threads
    try:
        config = PruneConfig(budget, args.divisor, args.strict,  # type: ignore[arg-type]
                             attention=args.attention, one_shot=args.one_shot)
        if config.kind == "latency":
            from s2h_fx.deploy import check_runtime

            check_runtime(config.runtime or "", config.device)
    except (ValueError, S2HError) as exc:  # BudgetError is a ValueError too
        raise CliError(str(exc)) from exc
    return budget


def _training_options(p: argparse.ArgumentParser, epochs: int, batch_size: int) -> None:
    p.add_argument("--epochs", type=_positive_int, default=epochs,
                   help=f"training epochs (default {epochs})")
    p.add_argument("--batch-size", type=_positive_int, default=batch_size,
                   help=f"training batch size (default {batch_size})")
    p.add_argument("--lr", type=_positive_float, default=0.05,
                   help="learning rate of the weights: SGD, momentum 0.9, cosine (default 0.05)")
    p.add_argument("--latency-runs", type=_positive_int, default=50,
                   help="timed CPU runs per network for the latency column (default 50)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order (default 0)")


def _add_demo_parser(sub: Any) -> None:
    from s2h_fx.demo import DEFAULT_EPOCHS

    demo = sub.add_parser(
        "demo", help="S2H-prune resnet18 on scikit-learn's digits (CPU, no download) and "
                     "compare it with a dense model trained as long",
        description="Trains a dense resnet18 and an S2H-pruned one on scikit-learn's digits "
                    "(upsampled to 32x32) for the same epochs, prints a table (accuracy, "
                    "FLOPs, params, CPU latency, speed-up) and writes DIR/s2h_demo.png and "
                    "DIR/s2h_demo.json.")
    demo.add_argument("--budget", type=float, default=0.3,
                      help="fraction of the FLOPs to keep, in (0, 1] (default 0.3)")
    demo.add_argument("--out", type=Path, default=Path("s2h_demo"), metavar="DIR",
                      help="where to write the plot and the JSON table (default ./s2h_demo)")
    _training_options(demo, DEFAULT_EPOCHS, 64)


def _add_prune_parser(sub: Any) -> None:
    prune = sub.add_parser(
        "prune", help="S2H-train a torchvision or timm model on a dataset under a FLOPs "
                      "budget and save the pruned model",
        description="Builds a torchvision or timm model (random weights, or --checkpoint) with "
                    "as many classes as the dataset, at its images' size, trains it with S2H (soft and hard networks, "
                    "learned masks) under the budget, prints a table (dense / soft / hard / "
                    "exported: accuracy, FLOPs, params, CPU latency) and saves the exported "
                    "network.")
    prune.add_argument("model", help=MODEL_HELP)
    prune.add_argument("--budget", type=float, required=True,
                       help="fraction of the FLOPs (or --budget-kind) to keep, in (0, 1]")
    _budget_options(prune, batch=True)
    data = prune.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", type=Path, metavar="DIR",
                      help="an image folder dataset: DIR/train/<class>/* and DIR/val/<class>/*")
    data.add_argument("--cifar10", type=Path, metavar="ROOT",
                      help="CIFAR-10 in torchvision's format: ROOT/cifar-10-batches-py/")
    data.add_argument("--cifar100", type=Path, metavar="ROOT",
                      help="CIFAR-100 in torchvision's format: ROOT/cifar-100-python/")
    data.add_argument("--fashion-mnist", type=Path, nargs="?", metavar="ROOT",
                      const=FASHION_MNIST_ROOT,
                      help="Fashion-MNIST's four IDX files (plain or .gz) in ROOT (default "
                           f"{FASHION_MNIST_ROOT}, from `apt-get install dataset-fashion-mnist`)"
                           "; grey images repeated to 3 channels")
    prune.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                       help="where to save: FILE.pt2 (torch.export, recommended) or FILE.pt")
    prune.add_argument("--input-size", type=_input_size, default=None, metavar="3,S,S",
                       help="training image size (default 3,32,32 for CIFAR, 3,28,28 for "
                            "Fashion-MNIST, 3,224,224 for a folder)")
    prune.add_argument("--checkpoint", type=Path, default=None, metavar="FILE",
                       help="start from this state_dict (torch.save(model.state_dict(), FILE)) "
                            "instead of random weights")
    prune.add_argument("--dense-baseline", action="store_true",
                       help="also train a dense copy for the same epochs, for the table's "
                            "dense row (default: the dense row is the starting weights)")
    prune.add_argument("--divisor", type=_positive_int, default=None,
                       help=DIVISOR_HELP)
    prune.add_argument("--attention", choices=ATTENTION_MODES, default="auto",
                       help=ATTENTION_HELP)
    prune.add_argument("--one-shot", choices=ONE_SHOT_RULES, default="per-cost",
                       help=ONE_SHOT_HELP)
    prune.add_argument("--strict", action="store_true",
                       help="fail on ops without a coupling rule instead of freezing their groups")
    prune.add_argument("--workers", type=_non_negative_int, default=0,
                       help="data loader worker processes (default 0)")
    prune.add_argument("--device", default=None,
                       help="training device, e.g. cpu or cuda (default: cuda when present)")
    prune.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                       help="write a training checkpoint to DIR at the end of every epoch "
                            "(atomically; the newest 3 kept)")
    prune.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="K",
                       help="also checkpoint every K training batches (needs --checkpoint-dir)")
    prune.add_argument("--resume", action="store_true",
                       help="continue the run whose checkpoints are in --checkpoint-dir, "
                            "exactly where it stopped (a new run when DIR holds none)")
    prune.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                       help="also plot accuracy and the hard FLOPs ratio over training")
    _training_options(prune, 5, 64)


# ---- building the pruner ---------------------------------------------------
def _load_model(name: str, *, num_classes: int | None = None,
                image_size: tuple[int, int] | None = None) -> nn.Module:
    """A torchvision model, or timm's as ``timm:NAME`` (s2h_fx.models); bad names and a
    missing timm are usage errors."""
    from s2h_fx.models import load_model

    try:
        return load_model(name, num_classes=num_classes, image_size=image_size)
    except InputError as exc:
        raise CliError(str(exc)) from exc


def _image_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """(H, W) of ``--input-size``, to build a timm model that takes a size for it."""
    size = args.input_size
    return (size[-2], size[-1]) if size and len(size) == 3 else None


def _example_size(args: argparse.Namespace) -> tuple[int, ...]:
    """``--input-size``, or the model's own (a timm model's configuration; 3x224x224)."""
    from s2h_fx.models import default_input_size

    return tuple(args.input_size) if args.input_size else default_input_size(args.model)


def _build(args: argparse.Namespace,
           budget: float | dict[str, Any]) -> tuple[nn.Module, torch.Tensor, Pruner]:
    """The model with seeded random weights, an example input and its pruner (eval mode)."""
    try:
        PruneConfig(budget, args.divisor, args.strict,  # type: ignore[arg-type]  # fail early
                    attention=args.attention, one_shot=args.one_shot)
    except ValueError as exc:  # BudgetError is a ValueError too
        raise CliError(str(exc)) from exc
    torch.manual_seed(args.seed)
    model = _load_model(args.model, image_size=_image_size(args))
    x = torch.randn(args.batch, *_example_size(args))
    log.info("tracing %s on an input of shape %s", args.model, tuple(x.shape))
    pruner = prune_graph(model, budget, (x,), divisor=args.divisor, strict=args.strict,
                         attention=args.attention, one_shot=args.one_shot)
    return model, x, pruner.eval()


# ---- measuring -------------------------------------------------------------
def _flops(module: nn.Module, x: torch.Tensor) -> float:
    return float(count_flops(module, x))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _leaves(o)]
    return []


def _max_rel_error(ref: Any, out: Any) -> float:
    """max |ref - out| / max |ref| over all output tensors."""
    pairs = list(zip(_leaves(ref), _leaves(out)))
    if not pairs or len(_leaves(ref)) != len(_leaves(out)):
        return float("inf")
    err = max(float((r.double() - o.double()).abs().max()) for r, o in pairs)
    scale = max(float(r.double().abs().max()) for r, _ in pairs)
    return err / max(scale, 1e-12)


# ---- saving ----------------------------------------------------------------
def _check_output(path: Path) -> None:
    if path.suffix not in SAVE_FORMATS:
        raise CliError(f"output {str(path)!r} must end in one of {', '.join(SAVE_FORMATS)}")
    if path.is_dir():
        raise CliError(f"output {str(path)!r} is a directory")
    if not path.parent.resolve().is_dir():
        raise CliError(f"output directory {str(path.parent)!r} does not exist")


def _export_program(pruned: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension, or a static one where the model fixes it."""
    x2 = x if len(x) > 1 else torch.cat([x, x])  # a batch of 1 would specialize to 1
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        return torch.export.export(pruned, (x2,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export raises many types; retry with a fixed batch
        log.warning("dynamic batch export failed (%s); exporting with batch size %d",
                    type(exc).__name__, x.shape[0])
    try:
        return torch.export.export(pruned, (x,))
    except Exception as exc:
        raise CliError(
            f"torch.export could not export the pruned model: {type(exc).__name__}: {exc}\n"
            "save it as a pickled GraphModule instead (-o FILE.pt)"
        ) from exc


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same directory, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(pruned: nn.Module, x: torch.Tensor, path: Path) -> None:
    try:
        if path.suffix == ".pt2":
            program = _export_program(pruned, x)
            _write_atomic(path, lambda f: torch.export.save(program, f))
            hint = f"torch.export.load({str(path)!r}).module()"
        else:
            _write_atomic(path, lambda f: torch.save(pruned, f))
            hint = f"torch.load({str(path)!r}, weights_only=False)"
    except OSError as exc:
        raise CliError(f"could not write {path}: {exc}") from exc
    print(f"wrote {path} ({SAVE_FORMATS[path.suffix]}); load it with {hint}")


# ---- commands --------------------------------------------------------------
def _inspect(args: argparse.Namespace) -> int:
    model, x, pruner = _build(args, 1.0)
    grouping = pruner.grouping
    print(pruner.groups)
    print(
        f"{args.model}: {len(grouping.prunable)} prunable and {len(grouping.frozen)} frozen "
        f"groups; {pruner.flops_model.total / 1e9:.3f} GFLOPs and {_params(model) / 1e6:.2f} M "
        f"params at input {'x'.join(map(str, x.shape))}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    _check_output(args.output)
    model, x, pruner = _build(args, _budget_of(args))
    pruned = pruner.export()
    with torch.no_grad():
        err = _max_rel_error(pruner(x), pruned(x))
    dense_flops, pruned_flops = _flops(model, x), _flops(pruned, x)
    dense_params, pruned_params = _params(model), _params(pruned)
    rows = [("GFLOPs", dense_flops / 1e9, pruned_flops / 1e9),
            ("M params", dense_params / 1e6, pruned_params / 1e6)]
    print(f"{args.model} at budget {args.budget:g}, input {'x'.join(map(str, x.shape))}")
    print(f"{'':10}{'dense':>12}{'pruned':>12}{'ratio':>8}")
    for label, dense, small in rows:
        print(f"{label:10}{dense:12.4f}{small:12.4f}{small / dense:8.3f}")
    print(f"max relative error, pruned(x) vs pruner(x): {err:.2e}")
    if not err <= MAX_REL_ERROR:
        print(f"error: the pruned model disagrees with the pruner (max relative error "
              f"{err:.2e} > {MAX_REL_ERROR:g}); not writing {args.output}. This is a bug in "
              "s2h-fx: please report it with this command line.", file=sys.stderr)
        return 1
    _save(pruned, x, args.output)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from s2h_fx.demo import run_demo

    try:
        PruneConfig(args.budget)  # fail before the slow steps
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {str(args.out)!r} exists and is not a directory")
    if not args.out.parent.resolve().is_dir():
        raise CliError(f"directory {str(args.out.parent)!r} (parent of --out) does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(args.epochs, args.budget, args.out, batch_size=args.batch_size, lr=args.lr,
             seed=args.seed, latency_runs=args.latency_runs, progress=args.progress)
    return 0


def _device(name: str | None) -> str:
    """The training device: ``name``, checked to exist here, or cuda when present."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise CliError(f"--device {name!r}: {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name!r}: CUDA is not available on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(f"--device {name!r}: this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {name!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {name!r}: use cpu or cuda")
    return name


def _dataset_side(args: argparse.Namespace) -> int:
    """The default image side of ``prune``'s dataset: 32 for CIFAR, 28 for Fashion-MNIST,
    224 for an image folder."""
    if args.cifar10 is not None or args.cifar100 is not None:
        return 32
    return 28 if args.fashion_mnist is not None else 224


def _prune_loaders(args: argparse.Namespace) -> tuple[Any, Any, int, str]:
    """(train loader, val loader, number of classes, description) of the chosen dataset."""
    from s2h_fx import data

    cifar = ("cifar10" if args.cifar10 is not None
             else "cifar100" if args.cifar100 is not None else None)
    fashion = args.fashion_mnist is not None
    size = args.input_size or (3, _dataset_side(args), _dataset_side(args))
    if len(size) != 3 or size[0] != 3 or size[1] != size[2]:
        raise CliError(f"--input-size must be 3,S,S (RGB, square) for prune, got "
                       f"{','.join(map(str, size))}")
    try:
        if cifar is not None:
            root = args.cifar10 if cifar == "cifar10" else args.cifar100
            train, val = data.cifar_loaders(root, cifar, args.batch_size, size[1], args.seed,
                                            num_workers=args.workers)
            what = f"{cifar} from {root}"
        elif fashion:
            train, val = data.fashion_mnist_loaders(args.fashion_mnist, args.batch_size,
                                                    args.seed, channels=3, size=size[1],
                                                    num_workers=args.workers)
            what = f"fashion-mnist from {args.fashion_mnist}"
        else:
            train, val = data.folder_loaders(args.data_dir, args.batch_size, size[1], args.seed,
                                             num_workers=args.workers)
            what = f"image folder {args.data_dir}"
        classes = data.num_classes_of(train)
    except (InputError, OSError) as exc:  # DataError is an InputError
        raise CliError(str(exc)) from exc
    if classes < 2:
        raise CliError(f"{what} has {classes} class; S2H training needs at least 2")
    return train, val, classes, what


def _prune(args: argparse.Namespace) -> int:
    import copy

    from s2h_fx.demo import compare, format_table, last_epoch_note, plot_history, train_dense

    _check_output(args.output)
    if args.plot is not None and not args.plot.parent.resolve().is_dir():
        raise CliError(f"directory {str(args.plot.parent)!r} of --plot does not exist")
    budget = _budget_of(args)  # fail before the slow steps
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    if (args.resume or args.checkpoint_every) and args.checkpoint_dir is None:
        raise CliError("--resume and --checkpoint-every need --checkpoint-dir DIR")
    if args.checkpoint_dir is not None and args.checkpoint_dir.exists() \
            and not args.checkpoint_dir.is_dir():
        raise CliError(f"--checkpoint-dir {str(args.checkpoint_dir)!r} is not a directory")
    train_loader, val_loader, classes, what = _prune_loaders(args)

    torch.manual_seed(args.seed)
    side = args.input_size[1] if args.input_size else _dataset_side(args)
    model = _load_model(args.model, num_classes=classes, image_size=(side, side))
    if args.checkpoint is not None:
        try:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict)
                                  else state)
        except (OSError, RuntimeError, KeyError, TypeError, AttributeError,
                pickle.UnpicklingError) as exc:
            raise CliError(f"cannot load --checkpoint {str(args.checkpoint)!r} into "
                           f"{args.model} with {classes} classes: {exc}") from exc
    x = next(iter(val_loader))[0][:1]
    print(f"{args.model} ({classes} classes, "
          f"{'weights from ' + str(args.checkpoint) if args.checkpoint else 'random weights'}) "
          f"on {what}: {len(train_loader.dataset)} train / {len(val_loader.dataset)} val "
          f"images at {'x'.join(map(str, x.shape[1:]))}, budget {args.budget:g}, "
          f"{args.epochs} epochs on {device}")
    dense = copy.deepcopy(model)
    dense_acc = None
    if args.dense_baseline:
        torch.manual_seed(args.seed)
        dense_history = train_dense(dense, train_loader, args.epochs, val_loader=val_loader,
                                    lr=args.lr, device=device, progress=args.progress)
        dense_acc = dense_history[-1]["val_acc"]
        print(f"dense baseline: {args.epochs} epochs, val accuracy {dense_acc:.4f}")
    dense = dense.to(device)

    log.info("tracing %s on an input of shape %s", args.model, tuple(x.shape))
    pruner = prune_graph(model, budget, (x,), divisor=args.divisor, strict=args.strict,
                         attention=args.attention, one_shot=args.one_shot)
    torch.manual_seed(args.seed)
    history = pruner.fit(train_loader, args.epochs, val_loader=val_loader, lr=args.lr,
                         device=device, progress=args.progress,
                         checkpoint=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                         resume=args.resume)
    pruned = pruner.export()
    rows = compare(dense, pruner, pruned, val_loader, x, dense_acc=dense_acc,
                   latency_runs=args.latency_runs, device=device,
                   settled=any(r.settling for r in history))
    dense_label = (f"dense trained {args.epochs} epochs" if args.dense_baseline
                   else "dense = the starting weights, untrained")
    print(format_table(rows, f"{args.model}, budget {args.budget:g}, {args.epochs} epochs; "
                             f"{dense_label}; latency: CPU, batch 1, median of "
                             f"{args.latency_runs}"))
    print(last_epoch_note(history))
    if args.plot is not None:
        plot_history(history, args.budget, args.plot, final_ratio=rows[-1].flops_ratio,
                     final_acc=rows[-1].val_acc, title=f"S2H: {args.model} on {what}, budget {args.budget:g}")
        print(f"wrote {args.plot}")
    with torch.no_grad():
        err = _max_rel_error(pruner(x), pruned(x))
    print(f"max relative error, pruned(x) vs pruner(x): {err:.2e}")
    if not err <= MAX_REL_ERROR:
        print(f"error: the pruned model disagrees with the pruner (max relative error "
              f"{err:.2e} > {MAX_REL_ERROR:g}); not writing {args.output}. This is a bug in "
              "s2h-fx: please report it with this command line.", file=sys.stderr)
        return 1
    _save(pruned, x, args.output)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from s2h_fx import bench  # imported here: it imports this module

    return bench.run(args)


# ---- entry point -----------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (so captured output works)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    @property
    def stream(self) -> Any:
        return sys.stderr


def _configure_logging() -> None:
    """INFO from s2h-fx to stderr; other libraries' loggers are left as they are."""
    logger = logging.getLogger("s2h_fx")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``s2h-fx`` command line; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    _configure_logging()
    command = {"inspect": _inspect, "export": _export, "demo": _demo,
               "prune": _prune, "bench": _bench}[args.command]
    try:
        return command(args)
    except (CliError, S2HError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

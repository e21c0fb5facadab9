"""The ``s2h-fx`` command line: inspect a torchvision model's channel groups, or prune and export it.

    s2h-fx inspect resnet18 --input-size 3,224,224
    s2h-fx export resnet18 --budget 0.5 -o resnet18_half.pt2

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
import difflib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from s2h_fx.config import PruneConfig
from s2h_fx.errors import S2HError
from s2h_fx.pruner import Pruner, prune_graph

log = logging.getLogger(__name__)

PROG = "s2h-fx"
SAVE_FORMATS = {".pt2": "torch.export program", ".pt": "pickled GraphModule",
                ".pth": "pickled GraphModule"}
MAX_REL_ERROR = 1e-4  # pruned(x) vs pruner(x); both compute the same float32 sums


class CliError(Exception):
    """A bad command-line value, reported as ``error: <message>`` with exit status 2."""


# ---- argument parsing ------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
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
    common.add_argument("model", help="torchvision classification model name, e.g. resnet18")
    common.add_argument("--input-size", type=_input_size, default=(3, 224, 224),
                        metavar="C,H,W", help="example input size without batch (default 3,224,224)")
    common.add_argument("--batch", type=_positive_int, default=1, help="example batch size (default 1)")
    common.add_argument("--divisor", type=_positive_int, default=8,
                        help="widths are multiples of this where a group allows (default 8)")
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
                        help="fraction of the FLOPs to keep, in (0, 1]")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                        help="where to save: FILE.pt2 (torch.export, recommended) or FILE.pt "
                             "(pickle; load with torch.load(FILE, weights_only=False))")
    return parser


# ---- building the pruner ---------------------------------------------------
def _load_model(name: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CliError(
            f"unknown model {name!r}: not a torchvision classification model{hint} "
            f"(all {len(names)} names: torchvision.models.list_models(module=torchvision.models))"
        )
    return torchvision.models.get_model(name, weights=None).eval()


def _build(args: argparse.Namespace, budget: float) -> tuple[nn.Module, torch.Tensor, Pruner]:
    """The model with seeded random weights, an example input and its pruner (eval mode)."""
    try:
        PruneConfig(budget, args.divisor, args.strict)  # fail before the slow steps
    except ValueError as exc:  # BudgetError is a ValueError too
        raise CliError(str(exc)) from exc
    torch.manual_seed(args.seed)
    model = _load_model(args.model)
    x = torch.randn(args.batch, *args.input_size)
    log.info("tracing %s on an input of shape %s", args.model, tuple(x.shape))
    pruner = prune_graph(model, budget, (x,), divisor=args.divisor, strict=args.strict)
    return model, x, pruner.eval()


# ---- measuring -------------------------------------------------------------
def _flops(module: nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return float(counter.get_total_flops())


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
    model, x, pruner = _build(args, args.budget)
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
    command = {"inspect": _inspect, "export": _export}[args.command]
    try:
        return command(args)
    except (CliError, S2HError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

"""Quality at a FLOPs budget: S2H against Torch-Pruning + fine-tuning and s2h-fx's
one-shot widths + fine-tuning, from the same dense start, for the same epochs, on
real data (Fashion-MNIST, issue 12).

Protocol, per (model, seed): one dense model is trained ``E0`` epochs (saved next
to ``--out`` and reused by every method, and by ``--resume``). From it, per
budget, every method gets the same ``E1`` epochs with the same optimiser (SGD,
momentum 0.9 with Nesterov, weight decay 5e-4, cosine from lr 0.05 over the E1
epochs, batch 128: the library's one loop, :mod:`s2h_fx.loop`) and the same batches in the same
order (a fresh loader with the seed's generator for each method):

- ``s2h``: ``prune_graph(dense, budget)`` + ``s2h_fx.trainer.fit`` (its defaults,
  ``finish_training`` included), then ``export()``; no fine-tuning after.
- ``tp-magnitude`` / ``tp-taylor``: Torch-Pruning's ``MetaPruner`` (L1 magnitude,
  or first-order Taylor on the gradients of ``TAYLOR_BATCHES`` training batches),
  one shot, channels ranked globally, classifier ignored, ``round_to`` = s2h-fx's
  divisor (``--divisor``, default 8; at least that many channels a group: see
  :func:`tp_pruner_class`), its
  ``pruning_ratio`` bisected (``benchmarks/zoo.py``'s ``bisect_tp``, here up to
  ``TP_TRIALS`` trials, to within ``TP_TOL``) to the budget's FLOPs; then
  ``s2h_fx.trainer.fit_dense``. Its FLOPs follow the ratio in steps: one ratio
  moves every group at once, and a group loses 8 channels at a time, so on
  resnet20 no ratio lands between 0.3168 and 0.3588 of the FLOPs (global L1
  ranking, random weights). The closest trial is taken, whichever side; the row
  keeps every trial (``tp_trials``: [ratio, FLOPs ratio]) so a miss is visible.
- ``oneshot-l1``: s2h-fx's one-shot widths (``prune_graph(...).export()``: L1
  importance, least importance lost per FLOP), then ``fit_dense``;
  ``oneshot-share``: the same with ``one_shot="share"`` (least importance against the
  rest of its group; not in the presets).
- ``dense``: the E0 model trained E1 more epochs (``fit_dense``): E0 + E1 in all.
- ``s2h:NAME``: S2H with a variant's S2HConfig (the ablation): the built-in
  :data:`VARIANTS` (``before``: the training settings before issue 12;
  ``no-settle``, ``no-descent``, ``no-momentum``, ``constant-mask-lr``,
  ``settle-distill``: today's defaults with one change taken out or swapped), or
  ``--variant NAME=field=value,...``. Each S2H row keeps its whole S2HConfig
  (``s2h_config``); rows of different configs are never averaged together.

Each row (appended to ``--out`` as it finishes): test accuracy of the exported
(pruned) network on the test split, its FLOPs over the dense model's
(``s2h_fx.measure.count_flops`` on one 1x1x28x28 input), params, wall seconds of
the method (pruning + training; not the evaluation), versions and settings, and
``dense_start``, a digest of the dense start it trained from (a start retrained on
another machine need not be bit for bit the same: ``--table`` warns when one seed's
rows come from different starts).
``--table`` prints mean +- sample sd over seeds per (model, budget, method);
``--plot`` draws test accuracy against FLOPs ratio.

Models (1x28x28 input, 10 classes): ``resnet20`` and ``resnet56`` (CIFAR-style,
stages 16/32/64, 1x1-conv "option B" shortcuts where the shape changes),
``resnet18`` (torchvision's, 3x3 stride-1 stem, no max-pool), ``mobilenet_v2``
(torchvision's, stride-1 stem), ``vit`` (torchvision's VisionTransformer, 7x7
patches, 4 layers of 4 heads of width 32: its attention prunes by whole heads and
head widths by default; ``s2h:width-attention`` and ``s2h:heads-attention`` prune
one kind).

    python benchmarks/quality.py --preset cpu --out quality_cpu.jsonl --plot quality_cpu.png
    python benchmarks/quality.py --preset cpu --out quality_cpu.jsonl --resume   # after a stop
    python benchmarks/quality.py --preset gpu --out quality_gpu.jsonl
    python benchmarks/quality.py --models resnet20 --budgets 0.35 --seeds 0 --e0 1 --e1 1 \\
        --train-size 2000 --out check.jsonl
    python benchmarks/quality.py --table quality_cpu.jsonl --plot quality_cpu.png
    python benchmarks/quality.py --preset cpu --budgets 0.35 --threads 1 --resume \
        --methods s2h:before,s2h:no-settle,s2h:settle-distill,s2h:no-descent,s2h:no-momentum,s2h:constant-mask-lr \
        --out ablation_cpu.jsonl          # the ablation (seed by seed)

Presets (explicit options override them):

- ``cpu``: resnet20; 10,000 training images (seeded subset), the full 10,000 test
  images; E0 = 4, E1 = 10; budgets 0.15, 0.35, 0.55; seeds 0, 1, 2: the issue's
  protocol. That is per seed 316 dense steps, then per budget 790 S2H steps and
  3 x 790 fine-tuning steps, and 790 dense steps: 15 rows a seed, 45 in all.
  Time: from the issue's run of this setting on this 2-core machine (budget 0.35,
  one seed: dense E0+E1 189 s, s2h 393 s, oneshot-l1 110 s, tp 146 s each), about
  3 x (3 x 800 + 190) s, **about 2 h 10 min** on an otherwise idle machine.
  Measured here (2026-11-24, the machine shared with another training process,
  load average about 3 on 2 cores), ``--e0 1 --e1 1 --train-size 2000`` (16
  steps a method) with ``--threads 1``: s2h 27 s, oneshot-l1 5 s, dense 9 s (68
  s for those three with evaluations); with ``--threads 2`` the same run took s2h
  56 s, tp-magnitude 29 s, tp-taylor 95 s (12 Taylor gradient passes then; now
  one), oneshot-l1 3 s, dense 5 s, 314 s in all, and ``--e1 3`` 863 s (s2h 217 s,
  tp 91 and 111 s, oneshot-l1 74 s, dense 107 s: two threads fighting another
  process for two cores). Scaled by steps (fixed costs included, so an upper
  side), the 1-thread figures give about 1.7 s a S2H step and 0.3-0.6 s a plain
  one: about 5.5 h for the preset on a machine as busy as that. On a shared
  machine use ``--threads 1``; ``--resume`` continues a stopped run.
  Measured 2026-11-24 with today's S2H defaults, two 1-thread runs side by side on
  2 cores (this protocol and the ablation): dense start 267 s, s2h 645-997 s,
  tp-magnitude 314 s, tp-taylor 456 s, oneshot-l1 367 s, dense 577 s: about 50 min
  a seed and budget, so the whole preset (3 budgets x 3 seeds) takes about 5 h
  that way; the ablation's variants without settling take 1350-1900 s a run.
- ``gpu``: all four models, all 60,000 training images, E0 = 15, E1 = 30, the
  same budgets and seeds. Not run yet (no GPU was lent while this was written).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

Row = dict[str, Any]
METHODS = ("s2h", "tp-magnitude", "tp-taylor", "oneshot-l1", "dense")  # the presets'
PRUNED = METHODS[:-1]
EXTRA_METHODS = ("oneshot-share",)  # by --methods only
DIVISOR = 8
TP_TRIALS = 12      # bisection trials (zoo.py's bisect_tp) for Torch-Pruning's pruning_ratio
TP_TOL = 0.005      # ... stopping once its FLOPs ratio is this close to the budget
TAYLOR_BATCHES = 4
INPUT = (1, 28, 28)
SETTINGS = ("e0", "e1", "train_size", "test_size", "batch_size", "lr", "divisor")
# a row written before a setting existed ran at its default
SETTING_DEFAULTS = {"divisor": DIVISOR}


def setting(row: Row, key: str) -> Any:
    return row.get(key, SETTING_DEFAULTS.get(key))
# S2H variants for the ablation (``--methods s2h,s2h:NAME,...``; more with --variant):
# S2HConfig fields set over the library's defaults. Every row keeps the full
# S2HConfig it ran with (``s2h_config``), so a table read after the defaults change
# still says what ran.
VARIANTS: dict[str, dict[str, Any]] = {
    # the defaults before issue 12: constant mask steps without momentum, no descent,
    # no settling
    "before": {"mask_lr": 0.05, "mask_momentum": 0.0, "mask_nesterov": False,
               "mask_lr_follows_schedule": False, "descent_epochs": 0.0, "settle_epochs": 0},
    # today's defaults with one change taken out
    "no-settle": {"settle_epochs": 0},
    "no-descent": {"descent_epochs": 0.0},
    "no-momentum": {"mask_lr": 0.05, "mask_momentum": 0.0, "mask_nesterov": False},
    "constant-mask-lr": {"mask_lr_follows_schedule": False},
    "settle-distill": {"settle_mode": "distill"},
    # what an attention block prunes (a prune_graph option, not an S2HConfig field):
    # the default ("auto") prunes whole heads and their widths on the ViT
    "width-attention": {"attention": "width"},
    "heads-attention": {"attention": "heads"},
}
PRUNE_OPTIONS = ("attention",)  # variant keys passed to prune_graph
ABLATION = tuple(f"s2h:{v}" for v, fields in VARIANTS.items()
                 if not set(fields) & set(PRUNE_OPTIONS))
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"models": "resnet20", "train_size": 10000, "test_size": 10000, "e0": 4, "e1": 10,
            "budgets": "0.15,0.35,0.55", "seeds": "0,1,2"},
    "gpu": {"models": "resnet20,resnet56,resnet18,mobilenet_v2", "train_size": 60000,
            "test_size": 10000, "e0": 15, "e1": 30, "budgets": "0.15,0.35,0.55",
            "seeds": "0,1,2"},
}
DEFAULTS: dict[str, Any] = {"models": "resnet20", "budgets": "0.15,0.35,0.55", "seeds": "0,1,2",
                            "e0": 4, "e1": 10, "train_size": 10000, "test_size": None}


# ---- models -----------------------------------------------------------------------
class BasicBlock(nn.Module):
    """CIFAR ResNet block; a 1x1 conv + BN shortcut where the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. for small images: 3 stages of n blocks, 16/32/64."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def small_resnet18(num_classes: int = 10) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(INPUT[0], 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def small_mobilenet_v2(num_classes: int = 10) -> nn.Module:
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    model.features[0][0] = nn.Conv2d(INPUT[0], 32, 3, 1, 1, bias=False)
    return model


def small_vit(num_classes: int = 10) -> nn.Module:
    """torchvision's VisionTransformer for 28x28: 7x7 patches (16 tokens and a class
    token), 4 layers of 4 heads of width 32 (embedding 128, MLP 256)."""
    model = torchvision.models.VisionTransformer(
        image_size=INPUT[1], patch_size=7, num_layers=4, num_heads=4, hidden_dim=128,
        mlp_dim=256, num_classes=num_classes)
    model.conv_proj = nn.Conv2d(INPUT[0], 128, 7, 7)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": lambda: CifarResNet(20), "resnet56": lambda: CifarResNet(56),
    "resnet18": small_resnet18, "mobilenet_v2": small_mobilenet_v2, "vit": small_vit,
}


def build_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


# ---- helpers ----------------------------------------------------------------------
def _sibling(name: str) -> Any:
    """Another script of benchmarks/ as a module (they are not a package)."""
    key = f"benchmarks_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def loaders(args: argparse.Namespace, seed: int) -> tuple[Any, Any]:
    """Fresh (train, test) loaders: the same seed gives the same subset and batch order."""
    from s2h_fx.data import fashion_mnist_loaders

    return fashion_mnist_loaders(args.data, args.batch_size, seed, max_train=args.train_size,
                                 max_val=args.test_size)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def test_accuracy(model: nn.Module, loader: Iterable[Any], device: torch.device) -> float:
    model.eval()
    ok = seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        ok += int((model(x).argmax(-1) == y).sum())
        seen += y.numel()
    return ok / max(seen, 1)


def finetune(net: nn.Module, train_loader: Any, args: argparse.Namespace,
             device: torch.device) -> nn.Module:
    """E1 epochs of the library's plain training (the loop, optimiser and schedule S2H uses)."""
    from s2h_fx.trainer import fit_dense

    fit_dense(net, train_loader, args.e1, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
              device=device, progress=args.progress)
    return net


# ---- the dense start --------------------------------------------------------------
def dense_path(args: argparse.Namespace, name: str, seed: int) -> Path:
    folder = args.out.parent / f"{args.out.stem}_dense"
    return folder / (f"{name}_seed{seed}_e0-{args.e0}_train{args.train_size or 'all'}"
                     f"_b{args.batch_size}_lr{args.lr:g}.pt")


def dense_start(args: argparse.Namespace, name: str, seed: int,
                device: torch.device) -> tuple[nn.Module, float]:
    """The seed's dense model after E0 epochs (trained once, then read back); seconds spent."""
    from s2h_fx.trainer import fit_dense

    model = build_model(name, seed)
    path = dense_path(args, name, seed)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"{name} seed {seed}: dense start read from {path}", file=sys.stderr)
        return model.eval(), 0.0
    t0 = time.perf_counter()
    train_loader, _ = loaders(args, seed)
    torch.manual_seed(seed)
    fit_dense(model, train_loader, args.e0, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
              device=device, progress=args.progress)
    seconds = time.perf_counter() - t0
    print(f"{name} seed {seed}: dense start trained {args.e0} epochs in {seconds:.0f} s",
          file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return model.cpu().eval(), seconds


def start_checksum(model: nn.Module) -> str:
    """A short digest of a dense start's weights and buffers (names, dtypes, values):
    every row records the start it trained from. A start retrained on another machine
    need not be bit for bit the same (its float arithmetic may differ), and then the
    methods of one seed did not start alike; :func:`table` says so."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


# ---- the methods: each returns (network to evaluate, extra row fields) --------------
def s2h_config(method: str, args: argparse.Namespace) -> Any:
    """The S2HConfig of ``s2h`` (the defaults) or of a variant ``s2h:NAME``."""
    import dataclasses

    from s2h_fx.config import S2HConfig

    return dataclasses.replace(S2HConfig(), **{
        k: v for k, v in _overrides(method, args).items() if k not in PRUNE_OPTIONS})


def prune_options(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The prune_graph options of ``s2h`` (none: the defaults) or of a variant."""
    return {k: v for k, v in _overrides(method, args).items() if k in PRUNE_OPTIONS}


def _overrides(method: str, args: argparse.Namespace) -> dict[str, Any]:
    return {} if method == "s2h" else args.variants[method.split(":", 1)[1]]


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=field=value,field=value`` -> (NAME, {field: value}); values are Python
    literals (numbers, True/False); ``attention=width`` sets prune_graph's option."""
    import ast
    import dataclasses

    from s2h_fx.config import S2HConfig

    name, _, rest = text.partition("=")
    if not name or not rest:
        raise ValueError(f"--variant {text!r}: expected NAME=field=value[,field=value]")
    known = {f.name for f in dataclasses.fields(S2HConfig)}
    fields: dict[str, Any] = {}
    for item in rest.split(","):
        key, _, value = item.partition("=")
        if key in PRUNE_OPTIONS:
            fields[key] = value
            continue
        if key not in known:
            raise ValueError(f"--variant {name}: {key!r} is not an S2HConfig field "
                             f"({', '.join(sorted(known))}) or {', '.join(PRUNE_OPTIONS)}")
        fields[key] = ast.literal_eval(value)
    return name, fields


def run_s2h(dense: nn.Module, budget: float, args: argparse.Namespace, seed: int,
            device: torch.device, method: str = "s2h") -> tuple[nn.Module, Row]:
    import dataclasses

    import s2h_fx
    from s2h_fx.trainer import finish_training, fit

    train_loader, _ = loaders(args, seed)
    config = s2h_config(method, args)
    pruner = s2h_fx.prune_graph(copy.deepcopy(dense), budget, (torch.zeros(2, *INPUT),),
                                divisor=args.divisor, config=config,
                                **prune_options(method, args))
    torch.manual_seed(seed)
    history = fit(pruner, train_loader, args.e1, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                  device=device, progress=args.progress, finish=False)
    trained = float(pruner.flops_ratio(pruner.mask_widths()))
    projected = finish_training(pruner, train_loader)
    return pruner.export(), {"trained_flops_ratio": trained, "projected": projected,
                             "skipped_steps": sum(r.skipped for r in history),
                             "s2h_config": dataclasses.asdict(config),
                             "attention": pruner.grouping.attention,
                             "widths": {str(g): w for g, w in pruner.widths.items()},
                             "final_train_hard_acc": history[-1].hard_acc if history else None}


def run_oneshot(rule: str) -> Callable[..., tuple[nn.Module, Row]]:
    """s2h-fx's one-shot widths by ``rule`` (``PruneConfig.one_shot``), fine-tuned."""
    def run(dense: nn.Module, budget: float, args: argparse.Namespace, seed: int,
            device: torch.device) -> tuple[nn.Module, Row]:
        import s2h_fx

        pruner = s2h_fx.prune_graph(copy.deepcopy(dense), budget, (torch.zeros(2, *INPUT),),
                                    divisor=args.divisor, one_shot=rule)
        net = pruner.export()
        train_loader, _ = loaders(args, seed)
        torch.manual_seed(seed)
        return finetune(net, train_loader, args, device), {
            "one_shot": rule, "widths": {str(g): w for g, w in pruner.widths.items()}}
    return run


def run_dense(dense: nn.Module, budget: float, args: argparse.Namespace, seed: int,
              device: torch.device) -> tuple[nn.Module, Row]:
    train_loader, _ = loaders(args, seed)
    torch.manual_seed(seed)
    return finetune(copy.deepcopy(dense), train_loader, args, device), {}


def tp_pruner_class() -> type:
    """Torch-Pruning's MetaPruner, except that ``round_to`` keeps at least ``round_to``
    channels in a group. Torch-Pruning 1.6 floors a group's remaining channels to a
    multiple of ``round_to``, to 0 when fewer remain, and then skips the whole group:
    its FLOPs jump back up as the ratio grows (resnet20, round_to 8, global ranking:
    ratio 0.5 -> 0.186 of the FLOPs, 0.55 -> 0.192, 0.6 -> 0.348), which no bisection
    can follow. With the floor at ``round_to`` (s2h-fx's divisor is a minimum width
    too) the FLOPs fall monotonically with the ratio."""
    import torch_pruning as tp

    class MinWidthPruner(tp.pruner.MetaPruner):  # type: ignore[misc]
        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            keep = current_channels - n_pruned
            keep = max(keep - keep % round_to, min(round_to, current_channels))
            return max(current_channels - keep, 0)

    return MinWidthPruner


def taylor_grads(dense: nn.Module, calib: list[Any], device: torch.device) -> list[torch.Tensor]:
    """The gradients Taylor importance reads: cross-entropy summed over ``calib``
    batches, eval mode, computed once and given to every bisection trial's copy."""
    work = copy.deepcopy(dense).to(device).eval()
    work.zero_grad()
    for xb, yb in calib:
        F.cross_entropy(work(xb.to(device)), yb.to(device)).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in work.parameters()]


def tp_prune(dense: nn.Module, ratio: float, importance: str, grads: list[torch.Tensor] | None,
             device: torch.device, divisor: int = DIVISOR) -> nn.Module:
    """A copy of ``dense`` pruned by Torch-Pruning at ``pruning_ratio=ratio``: channels
    ranked globally (``global_pruning=True``, each group's scores mean-normalised, as
    Torch-Pruning does by default), so the FLOPs can be matched finely."""
    import torch_pruning as tp

    work = copy.deepcopy(dense).to(device).eval()
    x = torch.zeros(1, *INPUT, device=device)
    classifier = _sibling("zoo").find_classifier(work, x)
    ignored = [work.get_submodule(classifier)] if classifier else []
    imp = (tp.importance.MagnitudeImportance(p=1) if importance == "magnitude"
           else tp.importance.TaylorImportance())
    pruner = tp_pruner_class()(work, x, importance=imp, pruning_ratio=ratio,
                               ignored_layers=ignored, round_to=divisor, global_pruning=True)
    if grads is not None:
        for p, g in zip(work.parameters(), grads):
            p.grad = g.clone()
    pruner.step()
    work.zero_grad(set_to_none=True)
    if isinstance(work, torchvision.models.VisionTransformer):
        # the fix-up Torch-Pruning's own torchvision example applies: the forward
        # reshapes by this attribute, which pruning the patch projection leaves stale
        work.hidden_dim = work.conv_proj.out_channels
    return work


def run_tp(importance: str) -> Callable[..., tuple[nn.Module, Row]]:
    def run(dense: nn.Module, budget: float, args: argparse.Namespace, seed: int,
            device: torch.device) -> tuple[nn.Module, Row]:
        from s2h_fx.measure import count_flops

        zoo = _sibling("zoo")
        train_loader, _ = loaders(args, seed)
        grads = None
        if importance == "taylor":
            grads = taylor_grads(dense, [b for _, b in zip(range(TAYLOR_BATCHES), train_loader)],
                                 device)
        x = torch.zeros(1, *INPUT, device=device)
        dense_flops = count_flops(copy.deepcopy(dense).to(device), x)
        trials: list[tuple[float, float]] = []

        def trial(ratio: float) -> tuple[float, nn.Module]:
            net = tp_prune(dense, ratio, importance, grads, device, args.divisor)
            trials.append((ratio, count_flops(net, x) / dense_flops))
            return trials[-1][1], net

        zoo.TP_TRIALS, zoo.TP_RATIO_TOL = TP_TRIALS, TP_TOL  # bisect_tp reads these
        ratio, (flops, net) = zoo.bisect_tp(trial, budget)
        train_loader, _ = loaders(args, seed)  # the same batch order as every method
        torch.manual_seed(seed)
        return finetune(net, train_loader, args, device), {
            "tp_pruning_ratio": ratio, "tp_flops_ratio": flops, "tp_trials": trials}
    return run


RUNNERS: dict[str, Callable[..., tuple[nn.Module, Row]]] = {
    "s2h": run_s2h, "tp-magnitude": run_tp("magnitude"), "tp-taylor": run_tp("taylor"),
    "oneshot-l1": run_oneshot("per-cost"), "oneshot-share": run_oneshot("share"),
    "dense": run_dense,
}


# ---- one row ----------------------------------------------------------------------
def versions() -> Row:
    import torch_pruning as tp

    import s2h_fx

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_pruning": tp.__version__, "s2h_fx": s2h_fx.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count()}


def settings_of(args: argparse.Namespace) -> Row:
    return {k: getattr(args, k) for k in SETTINGS}


def run_row(name: str, budget: float, seed: int, method: str, dense: nn.Module,
            args: argparse.Namespace, device: torch.device) -> Row:
    from s2h_fx.measure import count_flops

    t0 = time.perf_counter()
    if method.startswith("s2h:"):
        net, extra = run_s2h(dense, budget, args, seed, device, method)
    else:
        net, extra = RUNNERS[method](dense, budget, args, seed, device)
    seconds = time.perf_counter() - t0
    _, test_loader = loaders(args, seed)
    net = net.to(device).eval()
    x = torch.zeros(1, *INPUT, device=device)
    dense_flops = count_flops(copy.deepcopy(dense).to(device), x)
    return {"model": name, "budget": budget, "seed": seed, "method": method,
            "dense_start": start_checksum(dense),
            "test_acc": test_accuracy(net, test_loader, device),
            "flops_ratio": count_flops(net, x) / dense_flops, "flops": count_flops(net, x),
            "dense_flops": dense_flops, "params": params(net), "dense_params": params(dense),
            "seconds": seconds, **extra, **settings_of(args), "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "threads": torch.get_num_threads(), "versions": versions()}


def config_tag(config: dict[str, Any] | None) -> str | None:
    """An S2H row's S2HConfig as a string: rows of other configs are other cells."""
    return None if config is None else json.dumps(config, sort_keys=True)


def key_of(row: Row) -> tuple[Any, ...]:
    return (row["model"], float(row["budget"]), int(row["seed"]), row["method"],
            *(setting(row, k) for k in SETTINGS), config_tag(row.get("s2h_config")))


def read_rows(paths: Iterable[Path]) -> list[Row]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines()
            if line.strip()]


def planned(args: argparse.Namespace) -> list[tuple[str, int, list[tuple[float, str]]]]:
    """Per (model, seed): the (budget, method) cells to run; dense once at budget 1.0."""
    plan = []
    for name in args.models:
        for seed in args.seeds:
            cells = [(b, m) for b in args.budgets for m in args.methods if m != "dense"]
            if "dense" in args.methods:
                cells.append((1.0, "dense"))
            plan.append((name, seed, cells))
    return plan


def planned_tag(method: str, args: argparse.Namespace) -> str | None:
    import dataclasses

    if not method.startswith("s2h"):
        return None
    return config_tag(dataclasses.asdict(s2h_config(method, args)))


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    done = {key_of(r) for r in read_rows([args.out])} if args.out.exists() else set()
    settings = tuple(getattr(args, k) for k in SETTINGS)
    rows: list[Row] = []
    with args.out.open("a") as out:
        for name, seed, cells in planned(args):
            todo = [(b, m) for b, m in cells
                    if (name, b, seed, m, *settings, planned_tag(m, args)) not in done]
            skipped = len(cells) - len(todo)
            if skipped:
                print(f"{name} seed {seed}: {skipped} row(s) already in {args.out}, skipped",
                      file=sys.stderr)
            if not todo:
                continue
            dense, _ = dense_start(args, name, seed, device)
            for budget, method in todo:
                row = run_row(name, budget, seed, method, dense, args, device)
                out.write(json.dumps(row) + "\n")
                out.flush()
                rows.append(row)
                print(f"{name} budget {budget:g} seed {seed} {method}: test acc "
                      f"{row['test_acc']:.4f}, FLOPs {row['flops_ratio']:.3f}, "
                      f"{row['seconds']:.0f} s", file=sys.stderr, flush=True)
    return rows


# ---- table and plot -----------------------------------------------------------------
COLUMNS = ("model", "budget", "method", "seeds", "E0+E1", "train", "div", "test acc", "FLOPs ratio",
           "params (M)", "wall s")


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _pm(values: list[float], fmt: str) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:{fmt}} +- {'-' if sd is None else format(sd, fmt)}"


Cell = tuple[Any, ...]  # (model, budget, method, *settings)


def cells_of(rows: list[Row]) -> dict[Cell, list[Row]]:
    """Rows grouped per (model, budget, method) and settings (rows of other epochs or
    data sizes are not averaged together); a repeated (seed, settings) counts once."""
    unique = {key_of(r): r for r in rows}
    cells: dict[Cell, list[Row]] = {}
    for r in unique.values():
        cell = (r["model"], float(r["budget"]), r["method"], *(setting(r, k) for k in SETTINGS),
                config_tag(r.get("s2h_config")))
        cells.setdefault(cell, []).append(r)

    def order(k: Cell) -> tuple[Any, ...]:
        model, budget, method = k[:3]
        return (str(k[3:3 + len(SETTINGS)]), list(MODELS).index(model) if model in MODELS
                else 99, model, budget, METHODS.index(method) if method in METHODS else 99,
                method, str(k[-1]))
    return {k: cells[k] for k in sorted(cells, key=order)}


def table(rows: list[Row]) -> str:
    lines = [list(COLUMNS)]
    for (model, budget, method, *_), rs in cells_of(rows).items():
        lines.append([model, f"{budget:.2f}", method, str(len({r["seed"] for r in rs})),
                      f"{rs[0]['e0']}+{rs[0]['e1']}", str(rs[0]["train_size"] or 60000),
                      str(setting(rs[0], "divisor")),
                      _pm([r["test_acc"] for r in rs], ".4f"),
                      _pm([r["flops_ratio"] for r in rs], ".3f"),
                      f"{mean_sd([r['params'] / 1e6 for r in rs])[0]:.3f}",
                      _pm([r["seconds"] for r in rs], ".0f")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(line, widths))) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return ("\n".join(text) + "\n(mean +- sample sd over seeds; '-': one seed)"
            + "".join(f"\n{m}" for m in margins(rows))
            + "".join(f"\nwarning: {w}" for w in mixed_starts(rows)))


BASELINES = ("tp-taylor", "tp-magnitude", "oneshot-l1")


def aliased(rows: list[Row], aliases: dict[str, str]) -> list[Row]:
    """Rows of method A counted as method B (``--alias A=B``: the two are the same
    configuration under two names, e.g. ``s2h:descent3`` and the default that equals
    it); their S2HConfig no longer splits cells. Two rows of one (budget, seed) under
    the two names are an error: which one to count would be a guess."""
    if not aliases:
        return rows
    names = set(aliases) | set(aliases.values())
    out = [{**r, "method": aliases.get(r["method"], r["method"]), "s2h_config": None}
           if r["method"] in names else r for r in rows]
    seen: dict[tuple[Any, ...], str] = {}
    for r, new in zip(rows, out):
        if new["method"] in aliases.values():
            k = key_of(new)
            if k in seen and seen[k] != r["method"]:
                raise SystemExit(f"--alias: budget {r['budget']} seed {r['seed']} has rows of both "
                                 f"{seen[k]} and {r['method']}")
            seen[k] = r["method"]
    return out


def margins(rows: list[Row]) -> list[str]:
    """Per (model, budget, settings): S2H's mean test accuracy minus the best
    baseline's mean, and the same paired by seed (S2H minus that seed's best baseline),
    in points. Only where one S2H cell and every baseline are present."""
    by: dict[tuple[Any, ...], dict[str, list[Row]]] = {}
    for (model, budget, method, *rest), rs in cells_of(rows).items():
        by.setdefault((model, budget, *rest[:-1]), {}).setdefault(method, []).extend(rs)
    out = []
    for (model, budget, *_), cells in by.items():
        s2h = cells.get("s2h", [])
        if not s2h or len({config_tag(r.get("s2h_config")) for r in s2h}) > 1 or not all(
                cells.get(b) for b in BASELINES):
            continue
        acc = {m: {r["seed"]: r["test_acc"] for r in cells[m]} for m in ("s2h", *BASELINES)}
        best = max(mean_sd(list(acc[b].values()))[0] for b in BASELINES)
        seeds = sorted(set(acc["s2h"]).intersection(*(acc[b] for b in BASELINES)))
        paired = [100 * (acc["s2h"][s] - max(acc[b][s] for b in BASELINES)) for s in seeds]
        mean = 100 * (mean_sd(list(acc["s2h"].values()))[0] - best)
        out.append(f"{model} {budget:.2f}: S2H - best baseline {mean:+.2f} "
                   f"points on the means; paired by seed "
                   + " / ".join(f"{p:+.2f}" for p in paired)
                   + (f" (mean {sum(paired) / len(paired):+.2f})" if paired else ""))
    return out


def mixed_starts(rows: list[Row]) -> list[str]:
    """(model, seed, settings) whose rows record more than one dense start: their
    methods were not compared from the same weights (rows from before the checksum
    carry none and are not counted)."""
    starts: dict[tuple[Any, ...], set[str]] = {}
    for r in rows:
        if r.get("dense_start"):
            key = (r["model"], r["seed"], *(setting(r, k) for k in SETTINGS))
            starts.setdefault(key, set()).add(r["dense_start"])
    return [f"{k[0]} seed {k[1]}: rows from {len(v)} different dense starts "
            f"({', '.join(sorted(v))}); their methods did not start from the same weights"
            for k, v in starts.items() if len(v) > 1]


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = cells_of(rows)
    models = list(dict.fromkeys(k[0] for k in cells))  # (several settings: one plot each, please)
    fig, axes = plt.subplots(1, len(models), figsize=(max(7.0, 5.5 * len(models)), 4.4),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in (*METHODS, *EXTRA_METHODS):
            pts = sorted((mean_sd([r["flops_ratio"] for r in rs])[0],
                          *mean_sd([r["test_acc"] for r in rs]))
                         for (m, _, me, *_), rs in cells.items() if m == model and me == method)
            if not pts:
                continue
            xs, ys, sds = zip(*pts)
            ax.errorbar(xs, ys, yerr=[s or 0.0 for s in sds], marker="*" if method == "dense"
                        else "o", capsize=3, label=method)
        ax.set(title=model, xlabel="FLOPs ratio (exported / dense)", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST: test accuracy at a FLOPs budget (mean +- sd over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a whole configuration (explicit options override it)")
    p.add_argument("--models", default=None, help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods; s2h:NAME runs S2H with a variant's S2HConfig")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FIELD=VALUE,...",
                   help="define an S2H variant s2h:NAME (S2HConfig fields over the defaults), "
                        f"besides the built-in ones ({', '.join(VARIANTS) or 'none'})")
    p.add_argument("--budgets", default=None, help="comma-separated FLOPs budgets")
    p.add_argument("--seeds", default=None, help="comma-separated seeds")
    p.add_argument("--e0", type=int, default=None, help="epochs of the shared dense start")
    p.add_argument("--e1", type=int, default=None, help="epochs every method gets after it")
    p.add_argument("--train-size", type=int, default=None,
                   help="seeded subset of the 60,000 training images (0: all; default "
                        "10000, preset gpu: all)")
    p.add_argument("--test-size", type=int, default=None,
                   help="seeded subset of the 10,000 test images (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="base lr of the cosine schedule")
    p.add_argument("--divisor", type=int, default=DIVISOR,
                   help="channel divisor of every method (s2h-fx's divisor, Torch-Pruning's "
                        "round_to and minimum width)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data", type=Path, default=None,
                   help="folder of the four Fashion-MNIST IDX files (default: Debian's "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", type=Path, default=Path("quality.jsonl"), help="JSON lines")
    p.add_argument("--resume", action="store_true", help="skip the rows already in --out")
    p.add_argument("--table", type=Path, nargs="+", default=None, metavar="FILE",
                   help="only print the table of these JSON lines files (and --plot)")
    p.add_argument("--alias", action="append", default=[], metavar="A=B",
                   help="with --table: count rows of method A as method B (the same "
                        "configuration under two names)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="accuracy against FLOPs ratio")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    chosen = {**DEFAULTS, **(PRESETS[args.preset] if args.preset else {})}
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_size == 0:
        args.train_size = None
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.variants = dict(VARIANTS)
    for text in args.variant:
        try:
            name, fields = parse_variant(text)
        except (ValueError, SyntaxError) as e:
            p.error(str(e))
        args.variants[name] = fields
    known_methods = (*METHODS, *EXTRA_METHODS, *(f"s2h:{v}" for v in args.variants))
    for name, known in (("model", MODELS), ("method", known_methods)):
        unknown = [v for v in getattr(args, f"{name}s") if v not in known]
        if unknown:
            p.error(f"unknown {name}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if any(not 0 < b <= 1 for b in args.budgets):
        p.error("budgets must be in (0, 1]")
    if args.e0 < 0 or args.e1 < 1:
        p.error("--e0 must be >= 0 and --e1 >= 1")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.table is None and not args.out.resolve().parent.is_dir():
        p.error(f"the folder of --out {args.out} does not exist")
    if args.table is None and args.out.exists() and args.out.stat().st_size and not args.resume:
        p.error(f"{args.out} already holds rows: pass --resume to skip them, or another --out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        aliases = dict(a.split("=", 1) for a in args.alias if "=" in a)
        if len(aliases) != len(args.alias):
            raise SystemExit(f"--alias expects A=B, got {args.alias}")
        rows = aliased(read_rows(args.table), aliases)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        print(f"Fashion-MNIST, {', '.join(args.models)}, budgets {args.budgets}, seeds "
              f"{args.seeds}, E0 {args.e0} + E1 {args.e1}, train {args.train_size or 60000}, "
              f"test {args.test_size or 10000}, {args.device}, {torch.get_num_threads()} "
              "thread(s)", file=sys.stderr)
        run(args)
        rows = read_rows([args.out])
        print(f"wall time {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(rows))
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fuzzing as a benchmark: seeded random architectures against the pruner's invariants.

Each case draws a small network from a grammar that covers the couplings the
rules know (residual adds, cat / split / chunk / slicing with sizes taken from
other tensors, grouped and depthwise convs, channel shuffles, SE gates, layer
scale, flatten heads, shared modules, numel / size / len arithmetic, matmul
attention, BatchNorm / GroupNorm / LayerNorm), prunes it with
``prune_graph(model, 0.5)`` and checks, for the one-shot widths and a few random
keep-sets:

- ``hard``: the emitted graph equals the hard network (``pruner.eval(); pruner(x)``);
- ``masked``: the emitted graph equals the masked emulation, where zeroing a
  channel is removing it (not when a LayerNorm normalises over the channels);
- ``flops``: ``pruner.flops()`` equals ``torch.utils.flop_counter`` on the emitted graph;
- ``full``: at full width the soft and the hard branch equal the original model;
- ``soft``: with fractional mask values v the soft network equals the original
  model with each channel scaled by v once where it is summed (v folded into the
  consumer's input weights; for q @ k^T into q's projection).

A model whose every group is frozen counts as "no prunable group", apart from
passes; anything raised is an error with its traceback's last line.

    python benchmarks/fuzz.py --n 1000 --json fuzz.jsonl
    python benchmarks/fuzz.py --only 17          # one seed, with its groups
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx
from s2h_fx.channels import FreezeReason
from s2h_fx.measure import count_flops

torch.fx.wrap("len")  # len(tensor) is recorded in the graph instead of failing to trace

INPUT_SHAPE = (2, 3, 8, 8)
BUDGET = 0.5
TOL = 1e-5  # hard, full, soft: relative error
MASKED_TOL = 1e-4  # zeroed channels still enter sums: other rounding (as tests/test_ladder.py)
FLOPS_TOL = 1e-9
WIDTHS = (16, 16, 24, 32)
KINDS = ("hard", "masked", "flops", "full", "soft")
# step kind -> weight in the draw
STEP_WEIGHTS = {
    "conv": 3, "res_conv": 2, "add": 2, "cat": 2, "split": 2, "slice": 2, "chunk": 1,
    "dw": 1, "gconv": 1, "shuffle": 1, "shuffle_block": 1, "se": 1, "layer_scale": 1,
    "shared": 1, "numel": 1, "attention": 1, "cat_block": 1,
}
FEATURES = (
    "conv", "batchnorm", "groupnorm", "layernorm", "residual", "cat", "split", "slice",
    "chunk", "size_from_tensor", "depthwise", "grouped", "shuffle", "se", "layer_scale",
    "shared", "numel", "len", "attention", "heads", "flatten_head",
)


# ---- the grammar ------------------------------------------------------------------

class FuzzNet(nn.Module):
    """A random network: ``plan`` is a list of steps over a growing list of tensors."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.mods = nn.ModuleDict()
        self.gammas = nn.ParameterDict()
        self.plan: list[tuple[Any, ...]] = []
        self.chans: list[int] = []
        self.cats: dict[int, tuple[int, int]] = {}  # tensor index -> its two cat operands
        self.features: set[str] = set()
        self.fold_out: list[str] = []  # linears whose output a matmul contracts
        self.layer_norm = False
        self._emit("conv", -1, self._cbr("stem", 3, self.rng.choice(WIDTHS)))
        for _ in range(self.rng.randint(3, 7)):
            kind = self.rng.choices(list(STEP_WEIGHTS), list(STEP_WEIGHTS.values()))[0]
            src = len(self.chans) - 1 if self.rng.random() < 0.6 else self.rng.randrange(len(self.chans))
            if not getattr(self, f"_add_{kind}")(src):
                self._add_conv(src)
        self._add_head(len(self.chans) - 1)
        del self.rng

    # ---- building blocks ------------------------------------------------------------
    def _name(self, role: str) -> str:
        return f"s{len(self.plan)}_{role}"

    def _emit(self, kind: str, *args: Any, width: int | None = None) -> None:
        self.plan.append((kind, *args))
        if width is None:
            width = self.mods[args[-1]][0].out_channels  # a cbr's conv
        self.chans.append(width)

    def _cbr(self, role: str, cin: int, cout: int, groups: int = 1) -> str:
        name = self._name(role)
        norm = self.rng.choice(["bn", "bn", "gn", "ln", "none"])
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=norm == "none")]
        if norm == "bn":
            bn = nn.BatchNorm2d(cout)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            layers.append(bn)
        elif norm == "gn":
            layers.append(nn.GroupNorm(4, cout))
        elif norm == "ln":
            layers.append(_ChannelsLastNorm(cout))
            self.layer_norm = True
        layers.append(nn.ReLU())
        self.mods[name] = nn.Sequential(*layers)
        self.features.add("conv")
        self.features.add({"bn": "batchnorm", "gn": "groupnorm", "ln": "layernorm"}.get(norm, "conv"))
        return name

    def _keeps_cat(self, i: int) -> None:
        """The last tensor carries tensor i's channels in place: a cat stays splittable
        (e.g. conv(cat(a, b)) + cat(a, b), then split on the cat boundary)."""
        if i in self.cats:
            self.cats[len(self.chans) - 1] = self.cats[i]

    def _same_width(self, i: int) -> list[int]:
        return [j for j, c in enumerate(self.chans) if c == self.chans[i] and j != i]

    def _add_conv(self, i: int) -> bool:
        self._emit("conv", i, self._cbr("conv", self.chans[i], self.rng.choice(WIDTHS)))
        return True

    def _add_res_conv(self, i: int) -> bool:
        self._emit("res_conv", i, self._cbr("res", self.chans[i], self.chans[i]))
        self._keeps_cat(i)
        self.features.add("residual")
        return True

    def _add_add(self, i: int) -> bool:
        same = self._same_width(i)
        if not same:
            return False
        self._emit("add", i, self.rng.choice(same), width=self.chans[i])
        self._keeps_cat(i)
        self.features.add("residual")
        return True

    def _add_cat(self, i: int) -> bool:
        j = self.rng.randrange(len(self.chans))
        self.cats[len(self.chans)] = (i, j)
        self._emit("cat", i, j, width=self.chans[i] + self.chans[j])
        self.features.add("cat")
        return True

    def _add_cat_block(self, i: int) -> bool:
        """y = cat(a, b); z = y + conv(y); one part of split(z) on the cat boundary."""
        j = self.rng.randrange(len(self.chans))
        c = self.chans[i] + self.chans[j]
        part = self.rng.randrange(2)
        self._emit("cat_block", i, i, j, self._cbr("cb", c, c), part, self._size_source(),
                   width=self.chans[(i, j)[part]])
        self.features.update({"cat", "split", "residual"})
        return True

    def _size_source(self) -> str:
        """How a split size or slice bound is written: a literal or read from a tensor."""
        how = self.rng.choice(["int", "shape", "size", "numel", "len"])
        if how != "int":
            self.features.add("size_from_tensor")
        if how in ("numel", "len"):
            self.features.add(how)
        return how

    def _add_split(self, i: int) -> bool:
        if not self.cats:
            return False
        k = self.rng.choice(sorted(self.cats))
        a, b = self.cats[k]
        part = self.rng.randrange(2)
        self._emit("split", k, a, b, part, self._size_source(), width=self.chans[(a, b)[part]])
        self.features.add("split")
        return True

    def _add_slice(self, i: int) -> bool:
        if self.cats and self.rng.random() < 0.8:  # on a cat boundary
            k = self.rng.choice(sorted(self.cats))
            a, b = self.cats[k]
            part = self.rng.randrange(2)
            self._emit("slice", k, a, part, self._size_source(), 0, width=self.chans[(a, b)[part]])
        else:  # the first half of one producer's channels: partial use, frozen
            if self.chans[i] % 16:
                return False
            self._emit("slice", i, -1, 0, "int", self.chans[i] // 2, width=self.chans[i] // 2)
        self.features.add("slice")
        return True

    def _add_chunk(self, i: int) -> bool:
        if self.chans[i] % 16:
            return False
        how = self.rng.choice(["mul", "swap", "add"])
        self._emit("chunk", i, how, width=self.chans[i] if how == "swap" else self.chans[i] // 2)
        self.features.add("chunk")
        return True

    def _add_dw(self, i: int) -> bool:
        c = self.chans[i]
        self._emit("conv", i, self._cbr("dw", c, c, groups=c))
        self.features.add("depthwise")
        return True

    def _add_gconv(self, i: int) -> bool:
        c, g = self.chans[i], self.rng.choice([2, 4])
        self._emit("conv", i, self._cbr("gconv", c, c, groups=g))
        self.features.add("grouped")
        return True

    def _add_shuffle(self, i: int) -> bool:
        self._emit("shuffle", i, self.rng.choice([2, 4]), width=self.chans[i])
        self.features.add("shuffle")
        return True

    def _add_shuffle_block(self, i: int) -> bool:
        """grouped conv -> shuffle -> grouped conv, in a residual block or not (ShuffleNet)."""
        c, g = self.chans[i], self.rng.choice([2, 4])
        first = self._cbr("sb1", c, c, groups=g)
        second = self._cbr("sb2", c, c, groups=g)
        residual = self.rng.random() < 0.6
        self._emit("shuffle_block", i, g, residual, first, second, width=c)
        self.features.update({"grouped", "shuffle"} | ({"residual"} if residual else set()))
        return True

    def _add_se(self, i: int) -> bool:
        c, hidden = self.chans[i], self.rng.choice([8, 16])
        name, how = self._name("se"), self.rng.choice(["conv", "linear", "linear_view"])
        if how == "conv":
            self.mods[name] = nn.ModuleList([nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)])
        else:
            self.mods[name] = nn.ModuleList([nn.Linear(c, hidden), nn.Linear(hidden, c)])
        self._emit("se", i, how, name, width=c)
        self._keeps_cat(i)
        self.features.add("se")
        return True

    def _add_layer_scale(self, i: int) -> bool:
        c = self.chans[i]
        name = self._name("gamma")
        how = self.rng.choice(["res", "plain", "flat"])
        shape = (c,) if how == "flat" else (c, 1, 1)
        self.gammas[name] = nn.Parameter(torch.rand(shape) + 0.5)
        block = self._cbr("ls", c, c) if how == "res" else ""
        self._emit("layer_scale", i, how, name, block, width=c)
        self._keeps_cat(i)
        self.features.update({"layer_scale"} | ({"residual"} if how == "res" else set()))
        return True

    def _add_shared(self, i: int) -> bool:
        """One module called twice: in a chain, or on two tensors that are then added."""
        same = self._same_width(i)
        j = self.rng.choice(same) if same and self.rng.random() < 0.5 else -1
        name = self._cbr("shared", self.chans[i], self.chans[i])
        self._emit("shared", i, j, name, width=self.chans[i])
        self.features.update({"shared"} | ({"residual"} if j >= 0 else set()))
        return True

    def _add_numel(self, i: int) -> bool:
        """A channel count used as a value: h * (K / h.numel()) and relatives."""
        how = self.rng.choice(["numel", "numel", "size", "len"])
        n, _, h, w = INPUT_SHAPE
        count = float(n * self.chans[i] * h * w) if how == "numel" else float(self.chans[i])
        self._emit("numel", i, how, count, width=self.chans[i])
        self._keeps_cat(i)
        self.features.update({"numel", how} - {"size"})
        return True

    def _add_attention(self, i: int) -> bool:
        """Tokens (N, HW, C) -> [LayerNorm] -> q, k, v -> softmax(q k^T) v -> proj (+ x)."""
        c, d = self.chans[i], self.rng.choice([16, 32])
        heads = self.rng.choice([1, 1, 2])
        name = self._name("att")
        ln = self.rng.random() < 0.5
        self.mods[name] = nn.ModuleDict({
            "ln": nn.LayerNorm(c) if ln else nn.Identity(),
            "q": nn.Linear(c, d), "k": nn.Linear(c, d), "v": nn.Linear(c, d), "proj": nn.Linear(d, c),
        })
        self.fold_out.append(f"mods.{name}.q")
        self.layer_norm |= ln
        residual = self.rng.random() < 0.5
        self._emit("attention", i, name, heads, float(d // heads) ** -0.5, residual, width=c)
        self.features.update({"attention"} | ({"layernorm"} if ln else set())
                             | ({"heads"} if heads > 1 else set())
                             | ({"residual"} if residual else set()))
        return True

    def _add_head(self, i: int) -> None:
        how = self.rng.choice(["mean", "flatten", "view"])
        cin = self.chans[i] * (1 if how == "mean" else 4)
        self.mods["head"] = nn.Linear(cin, 10)
        self.plan.append(("head", i, how))
        if how != "mean":
            self.features.add("flatten_head")

    # ---- running ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts: list[torch.Tensor] = []
        for kind, *args in self.plan:
            src = x if args[0] < 0 else ts[args[0]]
            ts.append(getattr(self, f"_run_{kind}")(ts, src, *args[1:]))
        return ts[-1]

    def _run_conv(self, ts: list, t: torch.Tensor, name: str) -> torch.Tensor:
        return self.mods[name](t)

    def _run_res_conv(self, ts: list, t: torch.Tensor, name: str) -> torch.Tensor:
        return t + self.mods[name](t)

    def _run_add(self, ts: list, t: torch.Tensor, j: int) -> torch.Tensor:
        return t + ts[j]

    def _run_cat(self, ts: list, t: torch.Tensor, j: int) -> torch.Tensor:
        return torch.cat([t, ts[j]], dim=1)

    def _size(self, ts: list, i: int, how: str) -> Any:
        """The channel count of tensor i, written as ``how`` says."""
        t = ts[i]
        if how == "shape":
            return t.shape[1]
        if how == "size":
            return t.size(1)
        if how == "numel":
            return t.numel() // (t.shape[0] * t.shape[2] * t.shape[3])
        if how == "len":
            return len(t[0])
        return self.chans[i]  # "int": a literal in the traced graph

    def _run_cat_block(self, ts: list, t: torch.Tensor, i: int, j: int, name: str, part: int,
                       how: str) -> torch.Tensor:
        y = torch.cat([t, ts[j]], dim=1)
        z = y + self.mods[name](y)
        return torch.split(z, [self._size(ts, i, how), self._size(ts, j, how)], dim=1)[part]

    def _run_split(self, ts: list, y: torch.Tensor, a: int, b: int, part: int, how: str) -> torch.Tensor:
        return torch.split(y, [self._size(ts, a, how), self._size(ts, b, how)], dim=1)[part]

    def _run_slice(self, ts: list, y: torch.Tensor, a: int, part: int, how: str,
                   half: int) -> torch.Tensor:
        if a < 0:
            return y[:, :half]
        bound = self._size(ts, a, how)
        return y[:, :bound] if part == 0 else y[:, bound:]

    def _run_chunk(self, ts: list, t: torch.Tensor, how: str) -> torch.Tensor:
        u, v = t.chunk(2, dim=1)
        if how == "mul":
            return u * v
        if how == "swap":
            return torch.cat([v, u], dim=1)
        return u + v

    def _run_shuffle(self, ts: list, t: torch.Tensor, g: int) -> torch.Tensor:
        n, c, h, w = t.shape
        return t.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

    def _run_shuffle_block(self, ts: list, t: torch.Tensor, g: int, residual: bool,
                           first: str, second: str) -> torch.Tensor:
        y = self.mods[second](self._run_shuffle(ts, self.mods[first](t), g))
        return t + y if residual else y

    def _run_se(self, ts: list, t: torch.Tensor, how: str, name: str) -> torch.Tensor:
        fc1, fc2 = self.mods[name]
        if how == "conv":
            return t * torch.sigmoid(fc2(F.relu(fc1(F.adaptive_avg_pool2d(t, 1)))))
        s = torch.sigmoid(fc2(F.relu(fc1(t.mean((2, 3))))))
        if how == "linear_view":
            n, c = t.shape[0], t.shape[1]
            return t * s.view(n, c, 1, 1)
        return t * s[:, :, None, None]

    def _run_layer_scale(self, ts: list, t: torch.Tensor, how: str, name: str, block: str) -> torch.Tensor:
        gamma = self.gammas[name]
        if how == "res":
            return t + gamma * self.mods[block](t)
        if how == "flat":
            return t * gamma.view(1, -1, 1, 1)
        return gamma * t

    def _run_shared(self, ts: list, t: torch.Tensor, j: int, name: str) -> torch.Tensor:
        m = self.mods[name]
        return m(t) + m(ts[j]) if j >= 0 else m(m(t))

    def _run_numel(self, ts: list, t: torch.Tensor, how: str, count: float) -> torch.Tensor:
        if how == "numel":
            return t * (count / t.numel())
        if how == "size":
            return t * (count / t.shape[1])
        return t * (count / len(t[0]))

    def _run_attention(self, ts: list, t: torch.Tensor, name: str, heads: int, scale: float,
                       residual: bool) -> torch.Tensor:
        m = self.mods[name]
        n, c, h, w = t.shape
        tokens = m["ln"](t.flatten(2).transpose(1, 2))
        q, k, v = m["q"](tokens), m["k"](tokens), m["v"](tokens)
        if heads > 1:
            length, d = q.shape[1], q.shape[2]
            q, k, v = (z.view(n, length, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        o = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v
        if heads > 1:
            o = o.transpose(1, 2).reshape(n, length, d)
        y = m["proj"](o).transpose(1, 2).reshape(n, c, h, w)
        return t + y if residual else y

    def _run_head(self, ts: list, t: torch.Tensor, how: str) -> torch.Tensor:
        if how == "mean":
            return self.mods["head"](t.mean((2, 3)))
        p = F.adaptive_avg_pool2d(t, 2)
        return self.mods["head"](p.flatten(1) if how == "flatten" else p.reshape(t.shape[0], -1))


class _ChannelsLastNorm(nn.Module):
    """LayerNorm over the channels of an N x C x H x W tensor (ConvNeXt style)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def build(seed: int) -> tuple[FuzzNet, torch.Tensor]:
    torch.manual_seed(seed)
    model = FuzzNet(seed).eval()
    return model, torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


# ---- the checks ------------------------------------------------------------------

@dataclass
class CaseResult:
    seed: int
    status: str = "pass"  # pass | mismatch | error | frozen
    features: list[str] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # kind, draw, value
    error: str = ""
    where: str = ""  # innermost s2h-fx frame of an error
    freeze_reasons: list[str] = field(default_factory=list)  # of the frozen groups
    prunable: int = 0
    budget: float = BUDGET  # 1.0 where BUDGET cannot be met (too much is frozen)
    frozen: int = 0
    seconds: float = 0.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)




def random_keep(pruner: s2h_fx.Pruner, rng: np.random.Generator) -> tuple[dict, dict]:
    """Per prunable group: a width among its candidates, and that many classes in whole atoms."""
    widths, keep = {}, {}
    for g in pruner.grouping.prunable:
        width = int(rng.choice(g.candidate_widths))
        atom_of = pruner.grouping.atom_of_class[g.index]
        atoms = rng.permutation(int(atom_of.max()) + 1)[: width // g.atom]
        widths[g.index], keep[g.index] = width, np.flatnonzero(np.isin(atom_of, atoms))
    return widths, keep


def check_widths(pruner: s2h_fx.Pruner, x: torch.Tensor, masked_too: bool) -> dict[str, float]:
    """Errors of the current widths: emitted vs hard, vs masked, and the FLOPs model."""
    emitted = pruner.export(enforce_budget=False)  # the drawn widths, not projected
    pruner.eval()
    with torch.no_grad():
        out = emitted(x)
        errs = {"hard": rel_err(pruner(x), out)}
        if masked_too:
            errs["masked"] = rel_err(pruner.masked_forward(x), out)
    measured = count_flops(emitted, x)
    errs["flops"] = abs(float(pruner.flops()) - measured) / max(measured, 1.0)
    return errs


def check_full_width(model: nn.Module, pruner: s2h_fx.Pruner, x: torch.Tensor) -> float:
    """All masks at one, full widths: soft and hard branch are the original model."""
    pruner.set_widths({g.index: g.size for g in pruner.grouping.prunable})
    pruner.eval()
    with torch.no_grad():
        ref = model(x)
        return max(rel_err(pruner.soft_forward(x), ref), rel_err(pruner(x), ref))


def check_soft(model: FuzzNet, pruner: s2h_fx.Pruner, x: torch.Tensor, rng: np.random.Generator) -> float:
    """Fractional mask values v: the soft network == the model with v folded in once per sum."""
    grouping, masks = pruner.grouping, pruner.masks()
    values = {g: torch.as_tensor(rng.uniform(0.5, 1.5, m.size), dtype=torch.float32)
              for g, m in masks.items()}

    def scale(name: str, axis: int, size: int) -> torch.Tensor | None:
        ids = grouping.slots.get((name, axis))
        if ids is None or len(ids) != size:
            return None
        out = torch.ones(size)
        for group_of, class_of in grouping.layers():  # both kinds of attention: a product
            for pos, (g, c) in enumerate(zip(group_of[ids], class_of[ids])):
                if g >= 0:
                    out[pos] *= values[int(g)][int(c)]
        return out

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mname, m in ref.named_modules():
            # a grouped conv sums over the channels of each conv group: where its weight's
            # input axis is a slot (channel i of every conv group tied), fold along it too
            summed_in = (isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1) or isinstance(m, nn.Linear)
            if summed_in and (s := scale(f"{mname}.weight", 1, m.weight.shape[1])) is not None:
                m.weight.mul_(s.view(1, -1, *[1] * (m.weight.dim() - 2)))
            if mname in model.fold_out and (s := scale(f"{mname}.weight", 0, m.weight.shape[0])) is not None:
                m.weight.mul_(s.view(-1, 1))
                m.bias.mul_(s)
        for g, m in masks.items():
            m.fixed.copy_(values[g])
            m.use_fixed = True
        try:
            return rel_err(pruner.soft_forward(x), ref(x))
        finally:
            for m in masks.values():
                m.fixed.fill_(1.0)
                m.use_fixed = False


TOLERANCES = {"hard": TOL, "masked": MASKED_TOL, "flops": FLOPS_TOL, "full": TOL, "soft": TOL}


def check_case(seed: int, draws: int = 3, verbose: bool = False) -> CaseResult:
    """Build the seed's network, prune it, and run every check; never raises."""
    start = time.perf_counter()
    res = CaseResult(seed)
    try:
        model, x = build(seed)
        res.features = sorted(model.features)
        try:
            pruner = _prune(model, x, res)
        except s2h_fx.NoPrunableChannelsError as e:
            res.status = "frozen"
            res.freeze_reasons = _reasons(str(e))
            if verbose:
                print(e)
            return res
        res.prunable, res.frozen = len(pruner.grouping.prunable), len(pruner.grouping.frozen)
        res.freeze_reasons = _reasons(" ".join(r for g in pruner.grouping.frozen for r in g.frozen))
        if verbose:
            print(model.plan, "\n", pruner.groups, sep="")
        _run_checks(res, model, pruner, x, draws)
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        res.status = "error"
        res.error = traceback.format_exception_only(type(e), e)[-1].strip()
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "s2h_fx" in f.filename
                  or "/passes/" in f.filename]
        if frames:
            res.where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}"
        if verbose:
            traceback.print_exc()
    finally:
        res.seconds = time.perf_counter() - start
    return res


def _reasons(text: str) -> list[str]:
    return [r.value for r in FreezeReason if r.value in text]


def _prune(model: FuzzNet, x: torch.Tensor, res: CaseResult) -> s2h_fx.Pruner:
    """prune_graph at BUDGET; where the frozen part alone is over it, at full width."""
    try:
        return s2h_fx.prune_graph(model, BUDGET, example_inputs=(x,))
    except s2h_fx.BudgetError:
        res.budget = 1.0
    return s2h_fx.prune_graph(model, 1.0, example_inputs=(x,))  # not chained to the BudgetError


def _run_checks(res: CaseResult, model: FuzzNet, pruner: s2h_fx.Pruner, x: torch.Tensor,
                draws: int) -> None:
    rng = np.random.default_rng(seed=res.seed)
    found: list[tuple[str, str, float]] = []
    for draw in range(draws + 1):
        if draw:  # draw 0: the one-shot widths prune_graph chose for the budget
            pruner.set_widths(*random_keep(pruner, rng))
        for kind, err in check_widths(pruner, x, masked_too=not model.layer_norm).items():
            found.append((kind, str(draw), err))
    found.append(("full", "-", check_full_width(model, pruner, x)))
    found.append(("soft", "-", check_soft(model, pruner, x, rng)))
    for kind, draw, err in found:
        if not err <= TOLERANCES[kind]:  # NaN counts as a mismatch
            res.mismatches.append({"kind": kind, "draw": draw, "value": err})
    if res.mismatches:
        res.status = "mismatch"


# ---- the benchmark -----------------------------------------------------------------

def summarize(results: list[CaseResult], seconds: float) -> dict[str, Any]:
    by_kind: dict[str, list[int]] = {k: [] for k in KINDS}
    for r in results:
        for kind in sorted({m["kind"] for m in r.mismatches}):
            by_kind[kind].append(r.seed)
    errors: dict[str, list[int]] = {}
    for r in results:
        if r.status == "error":
            errors.setdefault(f"{r.error} [{r.where}]", []).append(r.seed)
    frozen = [r for r in results if r.status == "frozen"]
    return {
        "summary": True, "cases": len(results),
        "passed": sum(r.status == "pass" for r in results),
        "mismatch_cases": sum(r.status == "mismatch" for r in results),
        "mismatches": {k: len(v) for k, v in by_kind.items()},
        "mismatch_seeds": {k: v for k, v in by_kind.items() if v},
        "errors": sum(len(v) for v in errors.values()), "error_seeds": errors,
        "all_frozen": len(frozen), "all_frozen_seeds": [r.seed for r in frozen],
        # the head's classes always reach the output: count the other reasons, per case
        "all_frozen_reasons": dict(Counter(x for r in frozen for x in r.freeze_reasons
                                           if x != FreezeReason.MODEL_OUTPUT.value).most_common()),
        "all_frozen_features": _feature_rates(results, frozen),
        # cases with some group frozen for a reason (an over-freeze is no failure, but shows here)
        "frozen_group_reasons": dict(Counter(x for r in results if r.status != "frozen"
                                             for x in r.freeze_reasons
                                             if x != FreezeReason.MODEL_OUTPUT.value).most_common()),
        "seconds": round(seconds, 1),
    }


def _feature_rates(results: list[CaseResult], subset: list[CaseResult]) -> dict[str, str]:
    """Per feature: 'in subset / in all' cases, most over-represented first."""
    total = Counter(f for r in results for f in r.features)
    sub = Counter(f for r in subset for f in r.features)
    order = sorted(sub, key=lambda f: -sub[f] / total[f])
    return {f: f"{sub[f]}/{total[f]}" for f in order}


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"cases {s['cases']}  passed {s['passed']}  mismatches {s['mismatch_cases']} "
        f"({', '.join(f'{k} {v}' for k, v in s['mismatches'].items())})  errors {s['errors']}  "
        f"all-frozen {s['all_frozen']}  time {s['seconds']} s",
    ]
    for kind, seeds in s["mismatch_seeds"].items():
        lines.append(f"  mismatch {kind}: seeds {_seeds(seeds)}")
    for err, seeds in s["error_seeds"].items():
        lines.append(f"  error {err}: seeds {_seeds(seeds)}")
    if s["all_frozen"]:
        lines.append(f"  all-frozen: seeds {_seeds(s['all_frozen_seeds'])}")
        lines.append(f"    reasons: {s['all_frozen_reasons']}")
        lines.append(f"    features (frozen/all): {s['all_frozen_features']}")
    lines.append(f"  cases with some (not all) groups frozen, by reason: {s['frozen_group_reasons']}")
    if s["mismatch_seeds"] or s["error_seeds"]:
        lines.append("  re-run one: python benchmarks/fuzz.py --only SEED")
    return "\n".join(lines)


def _seeds(seeds: list[int], limit: int = 15) -> str:
    head = " ".join(map(str, seeds[:limit]))
    return head + (f" ... (+{len(seeds) - limit})" if len(seeds) > limit else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="number of cases (seeds seed .. seed+n-1)")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--draws", type=int, default=3, help="random keep-sets per case")
    p.add_argument("--json", type=Path, help="append one JSON line per case, then a summary")
    p.add_argument("--stop-on-fail", action="store_true", help="stop at the first mismatch or error")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (tiny tensors: one is fastest)")
    p.add_argument("--only", type=int, action="append", help="run only this seed (repeatable), verbose")
    args = p.parse_args(argv)
    if args.n < 1 or args.draws < 0:
        p.error("--n must be >= 1 and --draws >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = args.only or list(range(args.seed, args.seed + args.n))
    torch.set_num_threads(args.threads)
    sink = args.json.open("a") if args.json else None
    results: list[CaseResult] = []
    start = time.perf_counter()
    try:
        for k, seed in enumerate(seeds, 1):
            r = check_case(seed, args.draws, verbose=bool(args.only))
            results.append(r)
            _report(r, sink)
            if k % 50 == 0 or k == len(seeds):
                c = Counter(x.status for x in results)
                print(f"[{k}/{len(seeds)}] pass {c['pass']} mismatch {c['mismatch']} error "
                      f"{c['error']} all-frozen {c['frozen']}  {time.perf_counter() - start:.0f} s",
                      flush=True)
            if args.stop_on_fail and r.status in ("mismatch", "error"):
                break
        summary = summarize(results, time.perf_counter() - start)
        print(format_summary(summary))
        if sink:
            sink.write(json.dumps(summary) + "\n")
    finally:
        if sink:
            sink.close()
    return 1 if summary["mismatch_cases"] or summary["errors"] else 0


def _report(r: CaseResult, sink: Any) -> None:
    if r.status == "mismatch":
        worst = ", ".join(f"{m['kind']}@{m['draw']} {m['value']:.2e}" for m in r.mismatches[:4])
        print(f"seed {r.seed}: mismatch {worst}", flush=True)
    elif r.status == "error":
        print(f"seed {r.seed}: error {r.error} [{r.where}]", flush=True)
    if sink:
        sink.write(json.dumps(asdict(r)) + "\n")
        sink.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

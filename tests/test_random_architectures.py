"""Seeded random small architectures built from the coupling patterns (residual adds,
gates, concatenations split back, depthwise and grouped convs, pooling): for random
widths and random kept channels, the emitted graph equals the hard network and the
masked emulation, and its FLOPs equal the FLOPs model."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx

from helpers import count_flops, random_keep, rel_err


class RandomNet(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.plan: list[tuple] = []
        self.layers = nn.ModuleList()
        chans = [8 * rng.randint(1, 3)]
        self.layers.append(self._cbr(3, chans[0]))
        self.plan.append(("conv", -1, 0))
        parts: dict[int, list[int]] = {}
        for _ in range(rng.randint(4, 9)):
            i = len(chans) - 1 if rng.random() < 0.5 else rng.randrange(len(chans))
            kind = rng.choice(["conv", "conv", "add", "cat", "dw", "gate", "split", "group"])
            same = [j for j in range(len(chans)) if chans[j] == chans[i] and j != i]
            if kind == "add" and same:
                self.plan.append(("add", i, rng.choice(same)))
                chans.append(chans[i])
            elif kind == "cat" and len(chans) > 1:
                j = rng.choice([j for j in range(len(chans)) if j != i])
                self.plan.append(("cat", i, j))
                parts[len(chans)] = [chans[i], chans[j]]
                chans.append(chans[i] + chans[j])
            elif kind == "split" and parts:
                k = rng.choice(sorted(parts))
                self.plan.append(("split", k, rng.randrange(2), parts[k]))
                chans.append(parts[k][self.plan[-1][2]])
            elif kind == "dw":
                self.layers.append(self._cbr(chans[i], chans[i], groups=chans[i]))
                self.plan.append(("conv", i, len(self.layers) - 1))
                chans.append(chans[i])
            elif kind == "group" and chans[i] % 4 == 0:
                self.layers.append(self._cbr(chans[i], chans[i], groups=4))
                self.plan.append(("conv", i, len(self.layers) - 1))
                chans.append(chans[i])
            elif kind == "gate":
                self.layers.append(nn.Conv2d(chans[i], chans[i], 1))
                self.plan.append(("gate", i, len(self.layers) - 1))
                chans.append(chans[i])
            else:
                cout = 8 * rng.randint(1, 4)
                self.layers.append(self._cbr(chans[i], cout))
                self.plan.append(("conv", i, len(self.layers) - 1))
                chans.append(cout)
        self.head = nn.Linear(chans[-1], 5)

    @staticmethod
    def _cbr(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts: list[torch.Tensor] = []
        for step in self.plan:
            kind = step[0]
            if kind == "conv":
                ts.append(self.layers[step[2]](x if step[1] < 0 else ts[step[1]]))
            elif kind == "add":
                ts.append(ts[step[1]] + ts[step[2]])
            elif kind == "cat":
                ts.append(torch.cat([ts[step[1]], ts[step[2]]], dim=1))
            elif kind == "split":
                ts.append(torch.split(ts[step[1]], step[3], dim=1)[step[2]])
            elif kind == "gate":
                g = torch.sigmoid(self.layers[step[2]](F.adaptive_avg_pool2d(ts[step[1]], 1)))
                ts.append(ts[step[1]] * g)
        return self.head(ts[-1].mean((2, 3)))


# draws whose every group is legitimately frozen (checked in the test below)
ALL_FROZEN = {14: "no smaller width"}


@pytest.mark.parametrize("seed", [s for s in range(18) if s not in ALL_FROZEN])
def test_random_architecture(seed: int) -> None:
    torch.manual_seed(seed)
    model = RandomNet(seed).eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(model, 1.0, example_inputs=(x,))
    for train in (False, True):
        model.train(train)
        pruner.train(train)
        widths, keep = random_keep(pruner, 100 * seed + int(train))
        pruner.set_widths(widths, keep)
        emitted = pruner.export().train(train)
        with torch.no_grad():
            out = emitted(x)
            assert rel_err(pruner.hard_forward(x), out) < 1e-5
            assert rel_err(pruner.masked_forward(x), out) < 1e-4
        assert pruner.flops() == pytest.approx(count_flops(emitted, (x,)), rel=1e-9)


def test_conv_group_across_a_cat_boundary_freezes_only_itself() -> None:
    """Seed 3: cat(conv2 (32), stem (8)) feeds two grouped convs (4 groups of 10, whole
    groups pruned). Conv group 3 holds cat channels 30-39: two of conv2's and all of the
    stem's, so removing it would change the stem's width by 8 and conv2's by 2, not in
    proportion: that one atom is frozen, and the three conv groups inside conv2's
    channels (30 channels, atoms of 10) stay prunable."""
    pruner = s2h_fx.prune_graph(RandomNet(3).eval(), 1.0, example_inputs=(torch.randn(2, 3, 8, 8),))
    frozen = sorted(g.size for g in pruner.grouping.frozen)
    prunable = [(g.size, g.atom) for g in pruner.grouping.prunable]
    assert frozen == [5, 10] and prunable == [(30, 10)]
    stem = next(g for g in pruner.grouping.groups if "layers.0.0:out" in g.members)
    assert stem.size == 10 and "only part of its channels are used" in stem.frozen[0]


@pytest.mark.parametrize("seed", sorted(ALL_FROZEN))
def test_random_architecture_all_frozen(seed: int) -> None:
    """Seed 14 has only 8-wide groups, which the divisor cannot shrink."""
    with pytest.raises(s2h_fx.NoPrunableChannelsError, match=ALL_FROZEN[seed]):
        s2h_fx.prune_graph(RandomNet(seed).eval(), 1.0, example_inputs=(torch.randn(2, 3, 8, 8),))

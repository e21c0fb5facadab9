"""Torch-Pruning's DependencyGraph as the oracle for s2h-fx's channel groups.

For resnet50, mobilenet_v2 and densenet121 every prunable s2h-fx group must
touch exactly the conv/linear/norm axes of one Torch-Pruning group (and the
reverse), at the same positions and with the same channel-to-channel
correspondence (``root_idxs``), which is what checks the concatenation
offsets of densenet. Torch-Pruning's pseudo-nodes (element-wise, concat,
split, reshape) are not layers and are left out of the comparison.

Member names follow ``ChannelGroup.members``: ``"conv:out"`` (weight axis 0
and bias), ``"conv:in"`` (weight axis 1), ``"bn"`` (a per-channel layer); a
depthwise convolution's input channels are its output channels, so both of
Torch-Pruning's handlers map to ``"conv:out"``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import s2h_fx

tp = pytest.importorskip("torch_pruning")

MODELS = ["resnet50", "mobilenet_v2", "densenet121"]
INPUT = (1, 3, 64, 64)

LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU)

# member -> frozenset of (channel tag, position on the member's axis); the tag is the
# s2h-fx class or Torch-Pruning's root index, so compare after `_relative_to`
Pairs = dict[str, frozenset[tuple[int, int]]]


@dataclass(frozen=True)
class Side:
    """One side's groups as (label, members, pairs)."""

    groups: tuple[tuple[str, frozenset[str], Pairs], ...]
    frozen: tuple[s2h_fx.ChannelGroup, ...] = ()


def _relative_to(pairs: Pairs, ref: str) -> Pairs:
    """Re-tag every position by the position of the same channel on member ``ref``."""
    at = dict(pairs[ref])
    assert len(at) == len(pairs[ref]), f"{ref} holds a channel twice"
    return {k: frozenset((at[t], p) for t, p in v) for k, v in pairs.items()}


def _classifier(model: nn.Module) -> nn.Linear:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1]


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _member(model_modules: dict[str, nn.Module], name: str, out_axis: bool) -> str | None:
    m = model_modules.get(name)
    if isinstance(m, LAYERS):
        return f"{name}:out" if out_axis or _depthwise(m) else f"{name}:in"
    if isinstance(m, NORMS):
        return name
    return None


@functools.cache
def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()


def _example() -> torch.Tensor:
    return torch.randn(INPUT, generator=torch.Generator().manual_seed(0))


@functools.cache
def ours(name: str) -> Side:
    model = _model(name)
    modules = dict(model.named_modules())
    grouping = s2h_fx.prune_graph(model, budget=1.0, example_inputs=(_example(),)).grouping
    out = []
    for g in grouping.prunable:
        pairs: dict[str, set[tuple[int, int]]] = {}
        for (path, axis), ids in grouping.slots.items():
            ids = np.asarray(ids).ravel()
            hit = np.flatnonzero(grouping.group_of_id[ids] == g.index)
            if hit.size == 0:
                continue
            key = _member(modules, path.rpartition(".")[0], axis == 0)
            assert key is not None, f"{name}: slot {path}[{axis}] of group {g.index} is no layer"
            cls = grouping.class_of_id[ids[hit]].tolist()
            pairs.setdefault(key, set()).update((int(c), int(p)) for c, p in zip(cls, hit.tolist()))
        label = f"group {g.index} ({g.producers[0][0].rpartition('.')[0]}:out)"
        out.append((label, frozenset(g.members), {k: frozenset(v) for k, v in pairs.items()}))
    return Side(tuple(out), grouping.frozen)


@functools.cache
def theirs(name: str) -> Side:
    model = _model(name)
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=_example())
    out = []
    for group in DG.get_all_groups(
        ignored_layers=[_classifier(model)], root_module_types=[nn.Conv2d, nn.Linear]
    ):
        pairs: dict[str, set[tuple[int, int]]] = {}
        for item in group.items:
            m = item.dep.target.module
            if not isinstance(m, nn.Module) or m not in names:
                continue  # pseudo-nodes: _ElementWiseOp, _ConcatOp, _SplitOp, _ReshapeOp
            key = _member(modules, names[m], DG.is_out_channel_pruning_fn(item.dep.handler))
            if key is None:
                continue
            assert len(item.root_idxs) == len(item.idxs)
            pairs.setdefault(key, set()).update(
                (int(r), int(i)) for r, i in zip(item.root_idxs, item.idxs)
            )
        label = f"TP group rooted at {names[group[0].dep.target.module]}:out"
        out.append((label, frozenset(pairs), {k: frozenset(v) for k, v in pairs.items()}))
    return Side(tuple(out))


def _diff(a: frozenset[str], b: frozenset[str], names: tuple[str, str] = ("ours", "TP's")) -> str:
    return f"    only in {names[0]}: {sorted(a - b)}\n    only in {names[1]}: {sorted(b - a)}"


def _nearest(members: frozenset[str], side: Side) -> tuple[str, frozenset[str]]:
    best = max(side.groups, key=lambda g: len(g[1] & members) / len(g[1] | members))
    return best[0], best[1]


def _unmatched(mine: Side, other: Side, mine_is_ours: bool) -> list[str]:
    other_sets = {g[1] for g in other.groups}
    lines = []
    for label, members, _ in mine.groups:
        if members in other_sets:
            continue
        near_label, near = _nearest(members, other)
        a, b = (members, near) if mine_is_ours else (near, members)
        lines.append(f"  {label} has no twin; nearest is {near_label}:\n{_diff(a, b)}")
    return lines


@pytest.mark.parametrize("name", MODELS)
def test_group_count_matches_torch_pruning(name: str) -> None:
    o, t = ours(name), theirs(name)
    assert len(o.groups) == len(t.groups), (
        f"{name}: {len(o.groups)} prunable s2h-fx groups, "
        f"{len(t.groups)} Torch-Pruning groups rooted at prunable convs/linears"
    )
    # the one group Torch-Pruning leaves out (its root is the ignored classifier) is frozen here
    clf = {n for n, m in _model(name).named_modules() if m is _classifier(_model(name))}.pop()
    assert [g.members for g in o.frozen] == [(f"{clf}:out",)], [
        (g.members, g.frozen) for g in o.frozen
    ]


@pytest.mark.parametrize("name", MODELS)
def test_groups_agree_with_torch_pruning(name: str) -> None:
    o, t = ours(name), theirs(name)
    sets_o = [g[1] for g in o.groups]
    sets_t = [g[1] for g in t.groups]
    problems = _unmatched(o, t, True) + _unmatched(t, o, False)
    dup_o = len(sets_o) - len(set(sets_o))
    dup_t = len(sets_t) - len(set(sets_t))
    if dup_o or dup_t:
        problems.append(f"  duplicate member sets: {dup_o} in ours, {dup_t} in TP's")
    assert not problems, f"{name}: groups disagree with Torch-Pruning:\n" + "\n".join(problems)
    # every member a group lists is a layer axis whose positions were compared
    for label, members, pairs in o.groups:
        assert members == frozenset(pairs), f"{name} {label}:\n{_diff(members, frozenset(pairs))}"


@pytest.mark.parametrize("name", MODELS)
def test_positions_agree_with_torch_pruning(name: str) -> None:
    """Same axis positions, and the same root channel at each, member by member."""
    by_set = {g[1]: g for g in theirs(name).groups}
    problems = []
    for label, members, pairs in ours(name).groups:
        twin = by_set.get(members)
        if twin is None:
            continue  # reported by test_groups_agree_with_torch_pruning
        root = twin[0].rpartition(" ")[2]  # Torch-Pruning's root, "<conv>:out"
        mine, its = _relative_to(pairs, root), _relative_to(twin[2], root)
        for key in sorted(members):
            a, b = mine[key], its[key]
            if a != b:
                problems.append(
                    f"  {label} / {key}: positions ours {sorted({p for _, p in a})[:8]}..., "
                    f"TP's {sorted({p for _, p in b})[:8]}...; "
                    f"{len(a - b)} (root channel, position) pairs only in ours, "
                    f"{len(b - a)} only in TP's"
                )
    assert not problems, f"{name}: positions disagree:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", MODELS)
def test_model_input_channels_belong_to_no_group(name: str) -> None:
    first = next(n for n, m in _model(name).named_modules() if isinstance(m, nn.Conv2d))
    for side in (ours(name), theirs(name)):
        assert all(f"{first}:in" not in g[1] for g in side.groups)


# densenet121, worked out from the architecture: block b starts with c0 channels and
# every dense layer appends 32 (growth rate); layer i's conv2 output therefore sits at
# c0 + 32 * (i - 1) in the input of every later layer of the block and of the block's
# transition (or of norm5 and the classifier after the last block).
DENSE_BLOCKS = {1: (64, 6), 2: (128, 12), 3: (256, 24), 4: (512, 16)}


def _dense_consumers(block: int, layer: int) -> tuple[frozenset[str], dict[str, range]]:
    c0, n = DENSE_BLOCKS[block]
    pos = range(c0 + 32 * (layer - 1), c0 + 32 * layer)
    b = f"features.denseblock{block}"
    members = {f"{b}.denselayer{layer}.conv2:out": range(32)}
    for j in range(layer + 1, n + 1):
        members[f"{b}.denselayer{j}.norm1"] = pos
        members[f"{b}.denselayer{j}.conv1:in"] = pos
    if block < 4:
        members[f"features.transition{block}.norm"] = pos
        members[f"features.transition{block}.conv:in"] = pos
    else:
        members["features.norm5"] = pos
        members["classifier:in"] = pos
    return frozenset(members), members


@pytest.mark.parametrize("block,layer", [(1, 1), (1, 6), (2, 5), (3, 24), (4, 1)])
def test_densenet_concat_consumers(block: int, layer: int) -> None:
    members, positions = _dense_consumers(block, layer)
    root = f"features.denseblock{block}.denselayer{layer}.conv2:out"
    for side_name, side in (("ours", ours("densenet121")), ("TP's", theirs("densenet121"))):
        found = [g for g in side.groups if root in g[1]]
        assert len(found) == 1, f"{side_name}: {len(found)} groups hold {root}"
        label, got, pairs = found[0]
        assert got == members, f"{side_name} {label} vs the architecture:\n" + _diff(
            got, members, (side_name, "the architecture")
        )
        rel = _relative_to(pairs, root)
        for key, pos in positions.items():
            want = {(k, p) for k, p in enumerate(pos)}
            assert rel[key] == want, f"{side_name} {label}: {key} at the wrong positions"

"""Pass 2: find the groups of channels that must be pruned together.

Reads: ``node.meta["tensor_meta"]`` (from trace_model).
Writes: ``node.meta[S2H_LAYOUT]`` (which channel ids each tensor carries) and
``node.meta[S2H_FLOP_REFS]`` (which axis sizes a node's FLOPs scale with).
Returns: a frozen :class:`GroupingResult`; the graph itself is not changed.

Every op is handled by a coupling rule (``s2h_fx.rules``); a rule that raises is
a bug and raises :class:`InvariantError` naming the node, the rule and the user's
line. Coupled ids form classes (union-find); classes linked by a producer or by
a block constraint form components (``networkx``), split into channel groups
that every space and tensor uses uniformly (so each tensor's width is a function
of the groups' widths). A group is frozen, with reasons, when it reaches a model
output, touches an op without a rule, or is used in a way its channels cannot
all follow. Grouped convs prune whole conv groups, or, where that would freeze
their channels (a channel shuffle), the same channels inside every conv group:
the analysis is then run a second time and the result with more prunable
channels is kept.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import networkx as nx
import numpy as np
from torch import fx, nn

from s2h_fx.channels import (
    S2H_LAYOUT,
    ChannelGroup,
    ChannelLayout,
    Factor,
    FreezeReason,
    GroupingResult,
    SlotKey,
)
from s2h_fx.errors import InvariantError, S2HError, UnsupportedOpError
from s2h_fx.passes.trace_model import user_line
from s2h_fx.rules import RuleContext, lookup_rule
from s2h_fx.rules.base import Rule, _get_attr, describe, iter_layouts
from s2h_fx.rules.sizes import S2H_SIZE_DEPS, check_size_uses, size_deps

log = logging.getLogger(__name__)

S2H_FLOP_REFS = "s2h_flop_refs"
S2H_MIXING = "s2h_mixing"  # (arg, axis) pairs (or arg indices) whose channels it sums over


def find_channel_groups(
    gm: fx.GraphModule, *, divisor: int = 8, strict: bool = False
) -> GroupingResult:
    ctx, result = _analyse(gm, divisor, frozenset())
    retry = _frozen_grouped_convs(gm, result)
    if retry:  # try pruning inside their conv groups instead of whole groups
        saved = {n: {k: n.meta.get(k) for k in _OWN_META} for n in gm.graph.nodes}
        alt_ctx, alt = _analyse(gm, divisor, retry)
        if _prunable_ids(alt) > _prunable_ids(result):
            log.info("grouped convs pruned inside their groups: %s", ", ".join(sorted(retry)))
            ctx, result = alt_ctx, alt
        else:
            for n, meta in saved.items():
                n.meta.update(meta)
    if ctx.unknown:
        msg = "ops without a coupling rule (their channels are kept whole): " + "; ".join(
            dict.fromkeys(ctx.unknown)
        )
        if strict:
            raise UnsupportedOpError(msg + ". Register a rule with s2h_fx.register_rule.")
        log.warning(msg)
    return result


_OWN_META = (S2H_SIZE_DEPS, S2H_LAYOUT, S2H_FLOP_REFS, S2H_MIXING)


def _analyse(
    gm: fx.GraphModule, divisor: int, tied_groups: frozenset[str]
) -> tuple[RuleContext, GroupingResult]:
    ctx = RuleContext(gm)
    ctx.tied_groups = tied_groups
    for node in gm.graph.nodes:
        node.meta[S2H_SIZE_DEPS] = size_deps(ctx, node)
        node.meta[S2H_LAYOUT] = _visit(ctx, node)
        check_size_uses(ctx, node)
        node.meta[S2H_FLOP_REFS] = ctx.flop_refs.get(node.name, None)
        node.meta[S2H_MIXING] = ctx.mixing.get(node.name, ())
    return ctx, _build_groups(ctx, gm, divisor)


def _frozen_grouped_convs(gm: fx.GraphModule, result: GroupingResult) -> frozenset[str]:
    """Grouped convs (more than one channel per group) whose output channels are frozen."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(str(node.target))
        if not isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) or m.groups == 1:
            continue
        ids = result.slots.get((f"{node.target}.weight", 0))
        if m.in_channels > m.groups and ids is not None and np.all(result.group_of_id[ids] < 0):
            out.append(node.name)
    return frozenset(out)


def _prunable_ids(result: GroupingResult) -> int:
    return int(np.count_nonzero(result.group_of_id >= 0))


def _visit(ctx: RuleContext, node: fx.Node) -> Any:
    if node.op == "placeholder":
        return ctx.blank(node)
    if node.op == "get_attr":
        return _attr_layout(ctx, node)
    if node.op == "output":
        for arg in node.all_input_nodes:
            ctx.freeze_layout(arg.meta.get(S2H_LAYOUT), FreezeReason.MODEL_OUTPUT, node)
        return None
    rule = lookup_rule(ctx.gm, node)
    labeled = any(
        lay.factors for a in node.all_input_nodes for lay in iter_layouts(a.meta.get(S2H_LAYOUT))
    )
    if rule is not None:
        return _apply_rule(ctx, node, rule)
    if labeled:
        ctx.unknown.append(describe(node))
        for a in node.all_input_nodes:
            ctx.freeze_layout(a.meta.get(S2H_LAYOUT), FreezeReason.UNKNOWN_OP, node)
    return ctx.blank(node)


def _apply_rule(ctx: RuleContext, node: fx.Node, rule: Rule) -> Any:
    """Run a coupling rule; a rule that raises is a bug, never an unknown op."""
    try:
        return rule(ctx, node)
    except S2HError:
        raise
    except Exception as exc:
        name = f"{getattr(rule, '__module__', '?')}.{getattr(rule, '__qualname__', rule)}"
        raise InvariantError(
            f"coupling rule {name} failed on node {node.format_node()}{user_line(node)}: "
            f"{type(exc).__name__}: {exc}. This is a bug in that rule (a built-in one: "
            "please report it); it is not treated as an op without a rule."
        ) from exc


def _attr_layout(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    tensor = _get_attr(ctx.gm, str(node.target))
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return None
    factors = tuple(
        Factor((axis,), ctx.param_ids(str(node.target), axis))
        for axis, size in enumerate(shape)
        if size > 1
    )
    return ChannelLayout(len(shape), factors)


def _build_groups(ctx: RuleContext, gm: fx.GraphModule, divisor: int) -> GroupingResult:
    n = ctx.num_ids
    root = np.fromiter((ctx.uf[i] for i in range(n)), dtype=np.int64, count=n)
    space_of = np.repeat(np.arange(len(ctx.spaces)), [s.size for s in ctx.spaces])
    link = nx.Graph()
    link.add_nodes_from(np.unique(root).tolist())
    producer_spaces = {int(space_of[ctx.slots[k][0]]) for k in ctx.producers}
    for si in sorted(producer_spaces):
        s = ctx.spaces[si]
        nx.add_path(link, np.unique(root[s.offset : s.offset + s.size]).tolist())
    for blk in ctx.blocks:
        nx.add_path(link, np.unique(root[blk]).tolist())
    arrays = _use_arrays(ctx, gm)
    comps = []
    for part in _split_by_use(ctx, root, link, arrays):
        in_group = np.isin(root, part)
        spaces = np.unique(space_of[in_group])
        if producer_spaces.intersection(spaces.tolist()):
            comps.append((int(np.flatnonzero(in_group)[0]), part))
    comps.sort()
    group_of = np.full(n, -1, dtype=np.int64)
    class_of = np.full(n, -1, dtype=np.int64)
    reasons: dict[int, list[str]] = defaultdict(list)
    sizes, atoms, atom_maps = [], [], []
    for gi, (_, roots) in enumerate(comps):
        ids = np.flatnonzero(np.isin(root, roots))
        # classes in order of first appearance
        _, first = np.unique(root[ids], return_index=True)
        ordered = root[ids][np.sort(first)]
        cls_index = {int(r): k for k, r in enumerate(ordered.tolist())}
        group_of[ids] = gi
        class_of[ids] = [cls_index[int(r)] for r in root[ids].tolist()]
        sizes.append(len(ordered))
        size, atom_of = _atoms(ctx, root, cls_index, reasons[gi])
        atoms.append(size)
        atom_maps.append(atom_of)
    for deps, sized, user in ctx.size_checks:
        used = set(np.unique(group_of[deps]).tolist()) - {-1}
        own = set(np.unique(group_of[sized]).tolist()) - {-1} if sized is not None else set()
        if used != own:
            ids = deps if sized is None else np.concatenate([deps, sized])
            ctx.freeze(ids, FreezeReason.SIZE_AS_VALUE, user)
    for ids, reason in ctx.frozen:
        for g in np.unique(group_of[ids]).tolist():
            if g >= 0:
                reasons[g].append(reason)
    _check_uniform(arrays, group_of, class_of, sizes, reasons)
    groups = []
    for gi in range(len(comps)):
        d = _divisor(sizes[gi], atoms[gi], divisor)
        why = _summarise(reasons[gi])
        if not why and sizes[gi] // d < 2:
            why = [FreezeReason.TOO_SMALL.value + f" ({d})"]
        members = _members(ctx, group_of, gi)
        prods = tuple(k for k in ctx.producers if np.any(group_of[ctx.slots[k]] == gi))
        groups.append(ChannelGroup(gi, sizes[gi], d, atoms[gi], members, prods, tuple(why)))
    keep = np.array([g.prunable for g in groups] + [False], dtype=bool)
    group_of = np.where(keep[group_of], group_of, -1)
    class_of = np.where(group_of >= 0, class_of, -1)
    return GroupingResult(
        tuple(groups), tuple(ctx.spaces), dict(ctx.slots), group_of, class_of,
        tuple(dict.fromkeys(ctx.unknown)), tuple(atom_maps),
    )


def _summarise(reasons: list[str], limit: int = 3) -> list[str]:
    """'<reason> at a, b, c (+n more)' for each distinct reason."""
    where: dict[str, list[str]] = defaultdict(list)
    for r in reasons:
        text, _, loc = r.partition(" at ")
        if loc and loc not in where[text]:
            where[text].append(loc)
        else:
            where.setdefault(text, [])
    out = []
    for text, locs in where.items():
        more = f" (+{len(locs) - limit} more)" if len(locs) > limit else ""
        out.append(text + (" at " + ", ".join(locs[:limit]) + more if locs else ""))
    return out


def _atoms(
    ctx: RuleContext, root: np.ndarray, cls: dict[int, int], why: list[str]
) -> tuple[int, np.ndarray]:
    """Atom size and, per class, the atom it belongs to (atoms are kept or dropped whole)."""
    uf = nx.utils.UnionFind(cls.keys())
    for blk in ctx.blocks:
        rs = [int(r) for r in np.unique(root[blk]).tolist()]
        if rs[0] in cls:
            uf.union(*rs)
    sets = sorted(uf.to_sets(), key=lambda s: min(cls[r] for r in s))
    atom_of = np.zeros(len(cls), dtype=np.int64)
    for k, members in enumerate(sets):
        atom_of[[cls[r] for r in members]] = k
    sizes = {len(s) for s in sets}
    if len(sizes) > 1:
        why.append(FreezeReason.NON_UNIFORM.value + " (blocks of unequal size)")
        return 1, np.arange(len(cls))
    return (sizes.pop() if sizes else 1), atom_of


def _divisor(size: int, atom: int, default: int) -> int:
    units = size // atom
    d = max(1, default // atom)
    while units % d:
        d -= 1
    return d * atom


def _use_arrays(ctx: RuleContext, gm: fx.GraphModule) -> list[tuple[np.ndarray, str]]:
    """The ids of every space and of every tensor's channel factor, with where they are."""
    arrays: list[tuple[np.ndarray, str]] = [
        (np.arange(s.offset, s.offset + s.size), s.name) for s in ctx.spaces
    ]
    for node in gm.graph.nodes:
        for lay in iter_layouts(node.meta.get(S2H_LAYOUT)):
            arrays.extend((f.ids.ravel(), node.name) for f in lay.factors)
    return arrays


def _split_by_use(
    ctx: RuleContext, root: np.ndarray, link: nx.Graph, arrays: list[tuple[np.ndarray, str]]
) -> list[np.ndarray]:
    """Split each linked component into parts that every space and tensor uses uniformly.

    ``conv(cat(a, b)) + cat(a, b)`` links a's and b's channels through the conv's
    output; a split on the cat boundary uses a's part only. Each part gets its own
    width, so every tensor's size stays a function of the widths. A class is told
    apart by how often each array holds it (a hash of that count vector); an atom
    (classes kept or dropped together) by the set of kinds of classes it holds. An
    atom of unlike classes (a conv group across a cat boundary) thus lands apart from
    the atoms of one kind, and _check_uniform freezes its part, and nothing else.
    """
    classes, inv = np.unique(root, return_inverse=True)
    if classes.size == 0:
        return []
    rng = np.random.default_rng(0)
    sig = np.zeros(len(classes), dtype=np.uint64)
    for ids, _ in arrays:
        used, counts = np.unique(inv[ids], return_counts=True)
        k1, k2 = rng.integers(1, 2**62, size=2, dtype=np.uint64)
        sig[used] += k1 * counts.astype(np.uint64) + k2
    atom = nx.utils.UnionFind(range(len(classes)))
    for blk in ctx.blocks:
        atom.union(*np.unique(inv[blk]).tolist())
    atom_of = np.fromiter((atom[c] for c in range(len(classes))), np.int64, len(classes))
    atom_sig = np.zeros(len(classes), dtype=np.uint64)  # the set of its classes' signatures
    pairs = np.unique(np.stack([atom_of.astype(np.uint64), sig]), axis=1)
    np.add.at(atom_sig, pairs[0].astype(np.int64), _mix(pairs[1]))
    comp_of = np.zeros(len(classes), dtype=np.uint64)
    for c, comp in enumerate(nx.connected_components(link)):
        comp_of[np.searchsorted(classes, sorted(comp))] = c
    _, part_of = np.unique(np.stack([comp_of, atom_sig[atom_of]]), axis=1, return_inverse=True)
    return [classes[part_of.ravel() == k] for k in range(int(part_of.max()) + 1)]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: sums of mixed values tell sets of signatures apart."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _check_uniform(
    arrays: list[tuple[np.ndarray, str]], group_of: np.ndarray, class_of: np.ndarray,
    sizes: list[int], reasons: dict[int, list[str]],
) -> None:
    """Every space and every tensor axis must use all channels of a group equally often
    (only parts merged by a block can break it)."""
    for ids, where in arrays:
        g = group_of[ids]
        for gi in np.unique(g[g >= 0]).tolist():
            counts = np.bincount(class_of[ids[g == gi]], minlength=sizes[gi])
            if counts.min() != counts.max():
                reasons[gi].append(f"{FreezeReason.PARTIAL_USE.value} at {where}")


def _members(ctx: RuleContext, group_of: np.ndarray, gi: int) -> tuple[str, ...]:
    names = []
    for (path, axis), ids in ctx.slots.items():
        if gi not in group_of[ids]:
            continue
        owner, _, param = path.rpartition(".")
        weight = f"{owner}.weight"
        if (path, axis) in ctx.producers:
            names.append(f"{owner or path}:out")
        elif param == "bias" and any(k[0] == weight for k in ctx.producers):
            continue
        elif param == "weight" and owner and _get_attr(ctx.gm, path).dim() >= 2:
            names.append(f"{owner}:in")
        elif not owner:  # a bare parameter of the model itself
            names.append(f"{path}[{axis}]")
        else:
            names.append(owner)
    return tuple(dict.fromkeys(names))


def slot_keys(result: GroupingResult) -> list[SlotKey]:
    return sorted(result.slots)


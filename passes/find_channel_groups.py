"""Pass 2: find the groups of channels that must be pruned together.

Reads: ``node.meta["tensor_meta"]`` (from trace_model).
Writes: ``node.meta[S2H_LAYOUT]`` (which channel ids each tensor carries) and
``node.meta[S2H_FLOP_REFS]`` (which axis sizes a node's FLOPs scale with).
Returns: a frozen :class:`GroupingResult`; the graph itself is not changed.

Every op is handled by a coupling rule (``s2h_fx.rules``); a rule that raises is
a bug and raises :class:`InvariantError` naming the node, the rule and the user's
line. Rules record coupled id pairs; their connected components are the classes,
and classes linked by a producer or by a block constraint form components
(both with scipy's sparse-graph components, then numpy over whole id arrays: no
Python loop runs per channel id, so a ViT-Base with its relative-position tables,
about 750,000 ids, groups in about a second), split into channel groups
that every space and tensor uses uniformly (so each tensor's width is a function
of the groups' widths). A group is frozen, with reasons, when it reaches a model
output, touches an op without a rule, or is used in a way its channels cannot
all follow. Grouped convs prune whole conv groups, or, where that would freeze
their channels (a channel shuffle), the same channels inside every conv group:
the analysis is then run a second time and the result with more prunable
channels is kept. ``attention="heads"`` (``RuleContext.heads``) prunes attention heads
whole instead of their width (s2h_fx.rules.heads); a tensor indexed by heads then holds
one id per head, which the uniform-use check accepts when every atom (head) occurs
equally often. ``attention="both"`` runs both analyses and merges them: the
whole-heads groups, plus each head-width group that lies inside one of them as a
second layer of labels (``GroupingResult.inner_group_of_id``): a head's channel is
kept when its head and its width position are, so every tensor axis over those
channels keeps heads x widths of them (checked as a grid, and on random keep sets,
before a width group is merged). ``attention="auto"`` (the default) analyses head
widths and, where the graph computes attention, both kinds, keeping both where they
leave at least as many producer channels prunable (whole heads alone where no head
width prunes and they prune more: a rotary attention, whose sin/cos tables vary
along the head width). With ``auto_both=False`` (a latency budget) auto picks head
widths or, where they prune more, whole heads.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import math
import operator
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import fx, nn

from s2h_fx.channels import (
    S2H_LAYOUT,
    ChannelGroup,
    ChannelLayout,
    Factor,
    FreezeReason,
    GroupingResult,
    SlotKey,
    SpaceKind,
)
from s2h_fx.config import ATTENTION_MODES
from s2h_fx.errors import InvariantError, S2HError, UnsupportedOpError
from s2h_fx.passes.trace_model import user_line
from s2h_fx.rules import RuleContext, lookup_rule
from s2h_fx.rules.base import Rule, _get_attr, describe, iter_layouts
from s2h_fx.rules.sizes import S2H_SIZE_DEPS, check_size_uses, size_deps

log = logging.getLogger(__name__)

S2H_FLOP_REFS = "s2h_flop_refs"
S2H_MIXING = "s2h_mixing"  # (arg, axis) pairs (or arg indices) whose channels it sums over


def find_channel_groups(
    gm: fx.GraphModule, *, divisor: int = 8, strict: bool = False, attention: str = "auto",
    auto_both: bool = True,
) -> GroupingResult:
    """``attention``: ``"width"`` prunes each attention head's width, ``"heads"`` whole
    heads, ``"both"`` whole heads and the width of those kept, ``"auto"`` both where the
    graph computes attention and whole heads leave at least as many producer channels
    prunable as head widths (else head widths, or whole heads where they prune more;
    ``auto_both=False``: never both, as for a latency budget); see
    s2h_fx.config.PruneConfig. The result's ``attention`` says which was used."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION_MODES))}, "
                         f"got {attention!r}")
    if attention == "both":
        ctx, result, changed = _both(gm, divisor, _analyse_mode(gm, divisor, False))
    else:
        ctx, result = _analyse_mode(gm, divisor, attention == "heads")
        changed = ctx.graph_changed  # an analysis may write into the graph (SDPA scale)
    if attention == "auto" and auto_both and _computes_attention(gm):
        # whole heads and their widths, where they prune no fewer producer channels
        widths = (ctx, result)
        (ctx, result), other = _keep_better(
            gm, widths, lambda: _both(gm, divisor, widths)[:2],
            # a tie goes to the analysis that prunes head widths inside whole heads
            lambda c, r: 2 * _prunable_producer_ids(c, r) + (r.inner_group_of_id is not None),
            "attention='auto': pruning whole heads and the width of the heads kept")
        changed |= other.graph_changed
    elif attention == "auto" and _heads_may_help(gm, ctx, result):
        # attention whose head width cannot be pruned (RoPE tables along it): whole heads
        (ctx, result), other = _keep_better(
            gm, (ctx, result), lambda: _analyse_mode(gm, divisor, True),
            lambda c, r: _prunable_producer_ids(c, r),
            "attention='auto': whole heads make more channels prunable than head widths; "
            "pruning whole heads")
        changed |= other.graph_changed  # its edits stay: each is exact on any pruning
    if changed:
        gm.recompile()
    if ctx.unknown:
        msg = "ops without a coupling rule (their channels are kept whole): " + "; ".join(
            dict.fromkeys(ctx.unknown)
        )
        if strict:
            raise UnsupportedOpError(msg + ". Register a rule with s2h_fx.register_rule.")
        log.warning(msg)
    return result


def _both(gm: fx.GraphModule, divisor: int,
          widths: Analysis) -> tuple[RuleContext, GroupingResult, bool]:
    """The whole-heads analysis (declaring attention's FLOPs on the head width too)
    merged with the head-width groups of ``widths`` (see :func:`_merge_head_widths`);
    and whether either analysis wrote into the graph."""
    ctx, result = _analyse_mode(gm, divisor, True, head_widths=True)
    merged = _merge_head_widths(gm, widths[0], widths[1], ctx, result)
    return ctx, merged, widths[0].graph_changed or ctx.graph_changed


def _computes_attention(gm: fx.GraphModule) -> bool:
    return any(n.target in _ATTENTION_OPS for n in gm.graph.nodes
               if n.op in ("call_function", "call_method"))


_OWN_META = (S2H_SIZE_DEPS, S2H_LAYOUT, S2H_FLOP_REFS, S2H_MIXING)
# what marks a graph as holding attention (for attention="auto")
_ATTENTION_OPS = (F.scaled_dot_product_attention, torch.matmul, operator.matmul, torch.bmm,
                  torch.einsum, "matmul", "bmm")


def _analyse_mode(
    gm: fx.GraphModule, divisor: int, heads: bool, head_widths: bool = False
) -> tuple[RuleContext, GroupingResult]:
    """One analysis in one attention mode; grouped convs whose channels it freezes are
    tried again pruned inside their conv groups, and the result with more prunable
    channels is kept."""
    ctx, result = _analyse(gm, divisor, frozenset(), heads, head_widths)
    retry = _frozen_grouped_convs(gm, result)
    if retry:  # try pruning inside their conv groups instead of whole groups
        (ctx, result), _ = _keep_better(
            gm, (ctx, result), lambda: _analyse(gm, divisor, retry, heads, head_widths),
            lambda c, r: _prunable_ids(r),
            "grouped convs pruned inside their groups: " + ", ".join(sorted(retry)))
    return ctx, dataclasses.replace(result, attention="heads" if heads else "width")


Analysis = tuple[RuleContext, GroupingResult]


def _keep_better(gm: fx.GraphModule, current: Analysis, run: Callable[[], Analysis],
                 score: Callable[[RuleContext, GroupingResult], int],
                 message: str) -> tuple[Analysis, RuleContext]:
    """Run another analysis and keep it where it scores higher (logging ``message``);
    else put back the node metadata the current one wrote. Also returns the other
    analysis's context (what it wrote into the graph stays either way)."""
    saved = {n: {k: n.meta.get(k) for k in _OWN_META} for n in gm.graph.nodes}
    alt = run()
    if score(*alt) > score(*current):
        log.info("%s", message)
        return alt, alt[0]
    for n, meta in saved.items():
        n.meta.update(meta)
    return current, alt[0]


def _heads_may_help(gm: fx.GraphModule, ctx: RuleContext, result: GroupingResult) -> bool:
    """Whether a whole-heads analysis is worth a try: the graph computes attention and
    some producer's channels are frozen for a reason other than reaching the output."""
    if not _computes_attention(gm):
        return False
    output = FreezeReason.MODEL_OUTPUT.value
    return any(g.producers and not all(r.startswith(output) for r in g.frozen)
               for g in result.frozen)


def _prunable_producer_ids(ctx: RuleContext, result: GroupingResult) -> int:
    """Output channels of producers (convs, linears, embeddings) in prunable groups: what
    pruning can take away, in either attention mode (tables indexed by heads are not
    counted, so whole heads do not win by them)."""
    ids = [ctx.slots[k] for k in ctx.producers]
    return int(np.count_nonzero(result.group_of_id[np.concatenate(ids)] >= 0)) if ids else 0


def _analyse(
    gm: fx.GraphModule, divisor: int, tied_groups: frozenset[str], heads: bool = False,
    head_widths: bool = False,
) -> tuple[RuleContext, GroupingResult]:
    ctx = RuleContext(gm)
    ctx.tied_groups = tied_groups
    ctx.heads = heads
    ctx.head_widths = head_widths
    for node in gm.graph.nodes:
        node.meta[S2H_SIZE_DEPS] = size_deps(ctx, node)
        node.meta[S2H_LAYOUT] = _visit(ctx, node)
        check_size_uses(ctx, node)
        node.meta[S2H_FLOP_REFS] = ctx.flop_refs.get(node.name, None)
        node.meta[S2H_MIXING] = ctx.mixing.get(node.name, ())
    return ctx, _build_groups(ctx, gm, divisor)


def _merge_head_widths(gm: fx.GraphModule, wctx: RuleContext, widths: GroupingResult,
                       hctx: RuleContext, heads: GroupingResult) -> GroupingResult:
    """``attention="both"``: the whole-heads analysis, with the head-width groups of the
    width analysis as a second layer of labels on the channels of the heads.

    A width group B joins when it lies inside one whole-heads group A of an attention
    block (a group holding ids that stand for heads) and the two cross as a grid: every
    head holds every width position of B equally often, so a head's channel (h, d) is
    kept when head h and position d are, and any tensor axis over such channels keeps
    (heads kept) x (positions kept) of them. Width groups that tie channels outside a
    block of heads, that share a tensor axis with channels B does not label, or on
    which the product fails a check on random keep sets, are left out: those heads
    then keep their width (never a wrong size). The ids of the two analyses are matched
    by the names of their spaces (each analysis numbers them in its own pass)."""
    where = {s.name: s for s in hctx.spaces}
    w2h = np.full(wctx.num_ids, -1, dtype=np.int64)
    for s in wctx.spaces:
        t = where.get(s.name)
        if t is not None and t.size == s.size:
            w2h[s.offset:s.offset + s.size] = np.arange(t.offset, t.offset + t.size)
    head_space = [np.arange(s.offset, s.offset + s.size) for s in hctx.spaces
                  if s.kind is SpaceKind.HEADS]
    head_groups = set(np.unique(heads.group_of_id[np.concatenate(head_space)]).tolist()
                      if head_space else []) - {-1}
    n = len(heads.group_of_id)
    inner_g, inner_c = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    accepted: list[int] = []
    by_group = np.argsort(widths.group_of_id, kind="stable")  # the ids of each group, once
    bounds = np.searchsorted(widths.group_of_id[by_group], np.arange(len(widths.groups) + 1))
    for b in widths.prunable:
        w_ids = by_group[bounds[b.index]:bounds[b.index + 1]]
        h_ids = w2h[w_ids]
        if np.any(h_ids < 0):
            continue
        outer = np.unique(heads.group_of_id[h_ids])
        if len(outer) != 1 or int(outer[0]) not in head_groups:
            continue
        a = heads.groups[int(outer[0])]
        atom = heads.atom_of_class[a.index][heads.class_of_id[h_ids]]
        natoms = int(heads.atom_of_class[a.index].max()) + 1
        grid = np.bincount(atom * b.size + widths.class_of_id[w_ids],
                           minlength=natoms * b.size)
        if grid.min() != grid.max():
            continue
        inner_g[h_ids], inner_c[h_ids] = b.index, widths.class_of_id[w_ids]
        accepted.append(b.index)
    rejected = _unmixed(gm, hctx, inner_g)
    while True:
        accepted = [b for b in accepted if b not in rejected]
        merged = _with_inner(heads, widths, accepted, np.where(np.isin(inner_g, accepted),
                                                                inner_g, -1), inner_c)
        if merged.inner_group_of_id is None:
            return merged
        bad = _inexact(gm, merged)
        if not bad:
            break
        rejected |= {accepted[b - merged.inner_from] for b in bad}
        log.warning("attention='both': the width of some heads keeps whole (%d groups: "
                    "their tensors' sizes are not heads x widths)", len(bad))
    log.info("attention='both': %d head-width groups inside %d blocks of heads",
             len(accepted), len(set(heads.group_of_id[merged.inner_group_of_id >= 0].tolist())))
    return merged


def _with_inner(heads: GroupingResult, widths: GroupingResult, accepted: list[int],
                inner_g: np.ndarray, inner_c: np.ndarray) -> GroupingResult:
    """The whole-heads result with the ``accepted`` width groups as its inner layer
    (numbered after its own groups)."""
    if not accepted:  # no head width prunes: whole heads alone
        return dataclasses.replace(heads, attention="heads")
    first = len(heads.groups)
    renumber = np.full(len(widths.groups) + 1, -1, dtype=np.int64)
    renumber[accepted] = np.arange(first, first + len(accepted))
    inner_g = renumber[inner_g]
    inner_c = np.where(inner_g >= 0, inner_c, -1)
    extra = tuple(dataclasses.replace(widths.groups[b], index=first + k)
                  for k, b in enumerate(accepted))
    return dataclasses.replace(
        heads, groups=heads.groups + extra, attention="both",
        atom_of_class=heads.atom_of_class + tuple(widths.atom_of_class[b] for b in accepted),
        inner_group_of_id=inner_g, inner_class_of_id=inner_c, inner_from=first)


def _unmixed(gm: fx.GraphModule, ctx: RuleContext, inner: np.ndarray) -> set[int]:
    """Head-width groups to leave out: those whose channels share a tensor axis (or a
    space) with channels no head-width group labels (the axis's size would be a sum,
    not the product of heads and widths), until none is left."""
    inner = inner.copy()
    rejected: set[int] = set()
    arrays = [ids for ids, _ in _use_arrays(ctx, gm, inner >= 0)]
    while True:
        found: set[int] = set()
        for ids in arrays:
            labels = inner[ids]
            has = labels >= 0
            if has.any() and not has.all():
                found |= set(np.unique(labels[has]).tolist())
        if not found:
            return rejected
        rejected |= found
        inner[np.isin(inner, list(found))] = -1


def _inexact(gm: fx.GraphModule, result: GroupingResult, trials: int = 4) -> set[int]:
    """Head-width groups on whose tensor axes (or sliced parameter axes, or axes the
    FLOPs model reads) the size is not the product of the heads kept and the widths
    kept (the FLOPs model and the shapes would disagree): checked on keep sets (whole
    heads, any width positions; every group narrower than full) against the kept count."""
    from s2h_fx.passes.build_flops_model import ids_axis_sizes, mask_extent
    from s2h_fx.passes.plan_surgery import kept_ids

    inner = result.inner_group_of_id
    assert inner is not None
    sizes = {g.index: g.size for g in result.prunable}
    rng = np.random.default_rng(0)
    keeps = []
    for trial in range(trials):
        keep, widths = {}, {}
        for g in result.prunable:
            # every group narrower than full at once (where the product fails it shows
            # when two factors shrink together): the smallest widths, then random ones
            narrower = g.candidate_widths[:-1] or g.candidate_widths
            w = int(narrower[0] if trial == 0 else rng.choice(narrower))
            atom_of = result.atom_of_class[g.index]
            chosen = rng.choice(int(atom_of.max()) + 1, size=w // g.atom, replace=False)
            keep[g.index], widths[g.index] = np.flatnonzero(np.isin(atom_of, chosen)), w
        keeps.append((kept_ids(result, keep), {**sizes, **widths}))
    # every tensor's channel factors, every sliced parameter axis, every FLOPs reference
    arrays = [f.ids for node in gm.graph.nodes
              for lay in iter_layouts(node.meta.get(S2H_LAYOUT)) for f in lay.factors]
    arrays += list(result.slots.values())
    arrays += [f.ids for node in gm.graph.nodes for _, refs in node.meta.get(S2H_FLOP_REFS) or ()
               for f, _ in refs]
    bad: set[int] = set()
    seen: set[tuple[tuple[int, ...], bytes]] = set()
    for ids in arrays:
        labels = inner[ids]
        if not (labels >= 0).any():
            continue
        key = (ids.shape, ids.tobytes())  # a tensor's channels are often its input's
        if key in seen:
            continue
        seen.add(key)
        for t in range(ids.ndim):
            axes = ids_axis_sizes(ids, t, result, sizes)
            for kept, widths in keeps:
                predicted = float(ids.shape[t])
                for a in axes:
                    predicted *= a.at(widths, sizes) / a.full
                if abs(predicted - mask_extent(kept[ids], t)) > 1e-6:
                    bad |= set(np.unique(labels[labels >= 0]).tolist())
    return bad


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
        if node.target not in _TUPLE_AWARE:
            _freeze_tuples(ctx, node)
        return _apply_rule(ctx, node, rule)
    if labeled:
        ctx.unknown.append(describe(node))
        for a in node.all_input_nodes:
            ctx.freeze_layout(a.meta.get(S2H_LAYOUT), FreezeReason.UNKNOWN_OP, node)
    return ctx.blank(node)


# rules that read an argument holding a tuple of tensors part by part, or only its
# metadata (``len(parts)``: no tensor flows on)
_TUPLE_AWARE = (operator.getitem, builtins.getattr, torch.cat, torch.concat, torch.concatenate,
                torch.stack, builtins.len, torch.numel, "size", "dim", "numel", "nelement")


def _freeze_tuples(ctx: RuleContext, node: fx.Node) -> None:
    """A tuple of tensors (a split's parts, a max's values and indices) passed whole to
    an op whose rule reads tensors one layout each: that rule would not see the parts'
    channels, and they would vanish from the analysis (their consumers uncoupled). They
    are frozen instead."""
    for a in node.all_input_nodes:
        val = a.meta.get(S2H_LAYOUT)
        if isinstance(val, (tuple, list)):
            ctx.freeze_layout(tuple(val), FreezeReason.IRREGULAR_LAYOUT, node)


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
    """Classes, parts and groups from the coupled ids, in time near-linear in the ids."""
    n = ctx.num_ids
    root = _components(n, ctx.edges)  # class of every id
    num_classes = int(root.max()) + 1 if n else 0
    link = [root[s] for s in (ctx.slots[k] for k in ctx.producers)] + [root[b] for b in ctx.blocks]
    comp_of = _components(num_classes, [(c[:-1], c[1:]) for c in link])
    atom_of = _components(num_classes, [(root[b][:-1], root[b][1:]) for b in ctx.blocks])
    prod_ids = np.concatenate([ctx.slots[k] for k in ctx.producers] or [np.zeros(0, np.int64)])
    # only ids linked to a producer's can be in a group: arrays of none of them (index
    # buffers, tables of their own) change no part of a group, and are not read
    linked = np.zeros(int(comp_of.max()) + 1 if n else 0, dtype=bool)
    linked[comp_of[root[prod_ids]]] = True
    arrays = _use_arrays(ctx, gm, linked[comp_of[root]] if n else None)
    part_of = _split_by_use(root, num_classes, comp_of, atom_of, arrays)[root]  # per id
    # parts that hold a producer's channels become groups, in order of their first id
    parts, first = np.unique(part_of, return_index=True)
    grouped = np.isin(parts, part_of[prod_ids])
    order = parts[grouped][np.argsort(first[grouped], kind="stable")]
    group_of_part = np.full(int(part_of.max()) + 1 if n else 0, -1, dtype=np.int64)
    group_of_part[order] = np.arange(len(order))
    group_of = group_of_part[part_of] if n else np.zeros(0, np.int64)
    # inside a group, classes are numbered in order of their first id
    _, first_of_class = np.unique(root, return_index=True)
    group_of_class = np.full(num_classes, -1, dtype=np.int64)
    group_of_class[root] = group_of
    by = np.lexsort((first_of_class, group_of_class))
    by = by[group_of_class[by] >= 0]
    sizes = np.bincount(group_of_class[by], minlength=len(order)).tolist()
    index_of_class = np.full(num_classes, -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    index_of_class[by] = np.arange(len(by)) - starts[group_of_class[by]]
    class_of = np.where(group_of >= 0, index_of_class[root], -1) if n else group_of
    reasons: dict[int, list[str]] = defaultdict(list)
    atoms, atom_maps = [], []
    for gi in range(len(order)):
        size, atom_map = _atoms(atom_of[by[starts[gi] : starts[gi + 1]]], reasons[gi])
        atoms.append(size)
        atom_maps.append(atom_map)
    num_groups = len(order)
    for deps, sized, user in ctx.size_checks:
        used = set(_groups_in(group_of[deps], num_groups))
        own = set(_groups_in(group_of[sized], num_groups)) if sized is not None else set()
        if used != own:
            ids = deps if sized is None else np.concatenate([deps, sized])
            ctx.freeze(ids, FreezeReason.SIZE_AS_VALUE, user)
    for ids, reason in ctx.frozen:
        for g in _groups_in(group_of[ids], num_groups):
            reasons[g].append(reason)
    _check_uniform(arrays, group_of, class_of, sizes, reasons, atom_maps if ctx.heads else None)
    members = _members(ctx, group_of, len(order))
    producers: dict[int, list[SlotKey]] = defaultdict(list)
    for k in ctx.producers:
        for g in _groups_in(group_of[ctx.slots[k]], num_groups):
            producers[g].append(k)
    groups = []
    for gi in range(len(order)):
        d = _divisor(sizes[gi], atoms[gi], divisor)
        why = _summarise(reasons[gi])
        if not why and sizes[gi] // d < 2:
            why = [FreezeReason.TOO_SMALL.value + f" ({d})"]
        groups.append(ChannelGroup(gi, sizes[gi], d, atoms[gi], members[gi],
                                   tuple(producers[gi]), tuple(why)))
    keep = np.array([g.prunable for g in groups] + [False], dtype=bool)
    group_of = np.where(keep[group_of], group_of, -1)
    class_of = np.where(group_of >= 0, class_of, -1)
    return GroupingResult(
        tuple(groups), tuple(ctx.spaces), dict(ctx.slots), group_of, class_of,
        tuple(dict.fromkeys(ctx.unknown)), tuple(atom_maps),
    )


def _groups_in(group_of_ids: np.ndarray, num_groups: int) -> list[int]:
    """The groups (>= 0) that occur, in order: a count, not a sort (called once per
    slot, producer and frozen set)."""
    found = group_of_ids[group_of_ids >= 0]
    return np.flatnonzero(np.bincount(found.ravel(), minlength=num_groups)).tolist()


def _components(n: int, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected component of each of ``n`` items linked by the (a[i], b[i]) pairs,
    numbered 0, 1, ... in order of each component's smallest item."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    a = np.concatenate([p[0] for p in pairs] + [np.zeros(0, np.int64)]).astype(np.int64)
    b = np.concatenate([p[1] for p in pairs] + [np.zeros(0, np.int64)]).astype(np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return _by_first(labels)  # so the numbering does not depend on scipy's


def _by_first(labels: np.ndarray) -> np.ndarray:
    """The labels renumbered 0, 1, ... in order of their first occurrence."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


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


def _atoms(atom_of: np.ndarray, why: list[str]) -> tuple[int, np.ndarray]:
    """Atom size and, per class (given in class order with its global atom), the atom it
    belongs to, numbered in order of their first class (atoms are kept or dropped whole)."""
    local = _by_first(atom_of)
    sizes = set(np.bincount(local).tolist())
    if len(sizes) > 1:
        why.append(FreezeReason.NON_UNIFORM.value + " (blocks of unequal size)")
        return 1, np.arange(len(atom_of))
    return (sizes.pop() if sizes else 1), local


def _divisor(size: int, atom: int, default: int) -> int:
    """The group's step: the run's divisor where it divides the size, else the largest
    step that keeps every multiple of it below the size a width, gcd(size, divisor)
    (in whole atoms). 184 channels at divisor 32 step by 8 (176, 160, ... stay
    reachable), not by 23, a divisor of 184 that no hardware favours. A group smaller
    than one step gets its own size (one width: kept whole, "too small")."""
    units, step = size // atom, max(1, default // atom)
    return size if units < step else math.gcd(units, step) * atom


Places = list[tuple[int, str]]  # (order of first listing, node or space name)


def _use_arrays(ctx: RuleContext, gm: fx.GraphModule,
                reach: np.ndarray | None = None) -> list[tuple[np.ndarray, Places]]:
    """The ids of every space and of every tensor's channel factor, with where they are.
    Equal arrays are listed once with every place that holds them (a conv's output,
    its norm's and its activation's carry the same ids: a ViT-Base's 782 arrays hold
    262 distinct ones), so the counting below sorts each id once. With ``reach`` (per
    id: may it join a group) arrays without such an id are left out: BEiT's relative
    position index buffers hold 465,000 of its 767,000 ids, none of them a channel."""
    out: list[tuple[np.ndarray, Places]] = []
    seen: dict[bytes, int] = {}

    def add(ids: np.ndarray, name: str, place: int) -> None:
        if reach is not None and not reach[ids].any():
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        key = ids.tobytes()
        i = seen.setdefault(key, len(out))
        if i == len(out):
            out.append((ids, []))
        out[i][1].append((place, name))

    for place, s in enumerate(ctx.spaces):
        add(np.arange(s.offset, s.offset + s.size), s.name, place)
    place = len(ctx.spaces)
    for node in gm.graph.nodes:
        for lay in iter_layouts(node.meta.get(S2H_LAYOUT)):
            for f in lay.factors:
                add(f.ids.ravel(), node.name, place)
                place += 1
    return out


def _class_counts(
    arrays: list[tuple[np.ndarray, Places]], class_of: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every (array, class) pair that occurs: array index, class and how often."""
    sizes = [ids.size for ids, _ in arrays]
    which = np.repeat(np.arange(len(arrays), dtype=np.int64), sizes)
    cls = class_of[np.concatenate([ids for ids, _ in arrays] + [np.zeros(0, np.int64)])]
    keep = cls >= 0
    key, counts = np.unique(which[keep] * max(num_classes, 1) + cls[keep], return_counts=True)
    return key // max(num_classes, 1), key % max(num_classes, 1), counts


def _split_by_use(
    root: np.ndarray, num_classes: int, comp_of: np.ndarray, atom_of: np.ndarray,
    arrays: list[tuple[np.ndarray, Places]],
) -> np.ndarray:
    """Split each linked component into parts that every space and tensor uses
    uniformly; returns the part of every class.

    ``conv(cat(a, b)) + cat(a, b)`` links a's and b's channels through the conv's
    output; a split on the cat boundary uses a's part only. Each part gets its own
    width, so every tensor's size stays a function of the widths. A class is told
    apart by how often each array holds it (a hash of that count vector); an atom
    (classes kept or dropped together) by the set of kinds of classes it holds. An
    atom of unlike classes (a conv group across a cat boundary) thus lands apart from
    the atoms of one kind, and _check_uniform freezes its part, and nothing else.
    """
    if num_classes == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(0)
    keys = rng.integers(1, 2**62, size=(len(arrays), 2), dtype=np.uint64)
    which, cls, counts = _class_counts(arrays, root, num_classes)
    sig = np.zeros(num_classes, dtype=np.uint64)
    np.add.at(sig, cls, keys[which, 0] * counts.astype(np.uint64) + keys[which, 1])
    atom_sig = np.zeros(num_classes, dtype=np.uint64)  # the set of its classes' signatures
    _, first = _pair_labels(atom_of, sig)
    np.add.at(atom_sig, atom_of[first], _mix(sig[first]))
    return _pair_labels(comp_of, atom_sig[atom_of])[0]


def _pair_labels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense labels of the distinct (a[i], b[i]) pairs (in sorted order), and one
    index holding each (a lexsort: np.unique(axis=1) sorts structured rows, ten
    times slower on a ViT's 750,000 classes)."""
    order = np.lexsort((b, a))
    new = np.ones(len(order), dtype=bool)
    new[1:] = (a[order][1:] != a[order][:-1]) | (b[order][1:] != b[order][:-1])
    labels = np.empty(len(order), dtype=np.int64)
    labels[order] = np.cumsum(new) - 1
    return labels, order[new]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: sums of mixed values tell sets of signatures apart."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _check_uniform(
    arrays: list[tuple[np.ndarray, Places]], group_of: np.ndarray, class_of: np.ndarray,
    sizes: list[int], reasons: dict[int, list[str]], atom_maps: list[np.ndarray] | None = None,
) -> None:
    """Every space and every tensor axis must use all channels of a group equally often
    (only parts merged by a block can break it). With ``atom_maps`` (whole-heads mode)
    it is enough that it uses every atom equally often: a tensor indexed by heads holds
    one id per head (attention logits, a relative position table), and as atoms are
    kept or dropped whole its size is still a function of the width."""
    if not sizes:
        return
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    flat = np.where(group_of >= 0, offsets[np.maximum(group_of, 0)] + class_of, -1)
    which, cls, counts = _class_counts(arrays, flat, int(offsets[-1]))
    group = np.searchsorted(offsets, cls, side="right") - 1
    # per (array, group): how many of the group's classes occur, and their counts' range
    pair, start = _runs(which, group)
    present = np.diff(np.append(start, len(which)))
    lo, hi = np.minimum.reduceat(counts, start), np.maximum.reduceat(counts, start)
    bad = (present != np.asarray(sizes)[pair[1]]) | (lo != hi)
    if atom_maps is not None and bad.any():
        bad &= ~_uniform_by_atom(which, cls, counts, offsets, atom_maps, pair)
    found = sorted((place, g, name) for a, g in pair[:, bad].T.tolist()
                   for place, name in arrays[a][1])
    for _, g, name in found:  # in the order of the places
        reasons[g].append(f"{FreezeReason.PARTIAL_USE.value} at {name}")


def _runs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (a[i], b[i]) pairs of pairs already in sorted order (as rows of a
    2 x n array) and where each run starts: np.unique(axis=1) without its sort."""
    new = np.ones(len(a), dtype=bool)
    new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    start = np.flatnonzero(new)
    return np.stack([a[start], b[start]]), start


def _uniform_by_atom(
    which: np.ndarray, cls: np.ndarray, counts: np.ndarray, offsets: np.ndarray,
    atom_maps: list[np.ndarray], pair: np.ndarray,
) -> np.ndarray:
    """Per (array, group) column of ``pair``: the array holds every atom of the group
    equally often (its classes' counts summed)."""
    natoms = np.array([int(m.max()) + 1 if m.size else 0 for m in atom_maps], dtype=np.int64)
    aoff = np.concatenate([[0], np.cumsum(natoms)]).astype(np.int64)
    atom_of_flat = np.concatenate([m + aoff[g] for g, m in enumerate(atom_maps)])
    total = max(int(aoff[-1]), 1)
    key, inverse = np.unique(which * total + atom_of_flat[cls], return_inverse=True)
    sums = np.bincount(inverse.ravel(), weights=counts)
    w, atom = key // total, key % total
    group = np.searchsorted(aoff, atom, side="right") - 1
    got, start = _runs(w, group)
    if not np.array_equal(got, pair):
        raise InvariantError("atom counts do not cover the same (tensor, group) pairs")
    present = np.diff(np.append(start, len(w)))
    lo, hi = np.minimum.reduceat(sums, start), np.maximum.reduceat(sums, start)
    return (present == natoms[got[1]]) & (lo == hi)


def _members(ctx: RuleContext, group_of: np.ndarray, num_groups: int) -> list[tuple[str, ...]]:
    """Each group's members (producers, parameter axes), in slot order."""
    weights = {k[0] for k in ctx.producers}
    producers = set(ctx.producers)
    names: list[list[str]] = [[] for _ in range(num_groups)]
    for (path, axis), ids in ctx.slots.items():
        owner, _, param = path.rpartition(".")
        weight = f"{owner}.weight"
        if (path, axis) in producers:
            name = f"{owner or path}:out"
        elif param == "bias" and weight in weights:
            continue
        elif param == "weight" and owner and _get_attr(ctx.gm, path).dim() >= 2:
            name = f"{owner}:in"
        elif not owner:  # a bare parameter of the model itself
            name = f"{path}[{axis}]"
        else:
            name = owner
        for g in _groups_in(group_of[ids], num_groups):
            names[g].append(name)
    return [tuple(dict.fromkeys(n)) for n in names]


def slot_keys(result: GroupingResult) -> list[SlotKey]:
    return sorted(result.slots)


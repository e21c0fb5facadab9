"""Matmul and attention over whole heads (``attention="heads"``).

In whole-heads mode a channel axis split in (..., H, D) is a plain factor over the
head axis and the channel axis, each head a block (rules.shape). In a matmul or in
``F.scaled_dot_product_attention`` the head axis is then a batch axis that carries
channels: q's and k's channels are contracted head by head (q[h, d] is k[h, d]); the
logits (..., H, L, S) carry one id per head (an id of its own that is the same
channel as q's first channel of that head, see ``RuleContext.head_ids``;
``RuleContext.head_rows`` maps it back to the head's row), so a
relative position bias added to them follows the heads; v's (H, D) channels pass to
the output, and v's heads are q's (v[h, d] is q[h, d]: a head is D classes, kept or
dropped whole). Channels on other batch axes pair up as in an element-wise op.
Anything else on a batch axis is frozen. Grouped-query attention (k and v with fewer
heads, repeated by ``repeat_interleave`` or SDPA's ``enable_gqa``) repeats their rows,
so a kv head and the query heads reading it are one head here.

A head's width D is whole, so FLOPs are declared on the head axis (its kept count is
affine in the group's width), never on D (D while the head is kept, not affine).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import fx

from s2h_fx.channels import ChannelLayout, Factor, FreezeReason
from s2h_fx.rules.base import LayoutValue, RuleContext
from s2h_fx.rules.elementwise import join


@dataclass
class Operand:
    """A matmul operand's channels: on its contracted axis and on its free axis, each
    plain (w,) or per head (H, w) (``head_axis``: the output axis of that head axis),
    and its channels on batch axes, one id per index (head ids included), on output
    axes."""

    contract: np.ndarray | None = None
    free: np.ndarray | None = None
    head_axis: int | None = None
    batch: list[Factor] = field(default_factory=list)

    @property
    def rows(self) -> np.ndarray | None:
        for part in (self.contract, self.free):
            if part is not None and part.ndim == 2:
                return part
        return None


def on_batch_axes(lay: ChannelLayout) -> bool:
    """Channels on an axis before the last two (a matmul's batch axes)."""
    return any(a < lay.ndim - 2 for f in lay.factors for a in f.axes)


def operand(ctx: RuleContext, node: fx.Node, lay: ChannelLayout, contract: int,
            nd: int) -> Operand:
    """Sort an operand's factors; a factor over several batch axes, over both inner
    axes, or a second one over a batch axis and an inner axis is frozen."""
    n, op = lay.ndim, Operand()
    for f in lay.factors:
        batch = [a for a in f.axes if a < n - 2]
        inner = [a for a in f.axes if a >= n - 2]
        if len(batch) > 1 or len(inner) > 1 or (batch and inner and op.head_axis is not None):
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
        elif not batch:
            if inner == [contract]:
                op.contract = f.ids
            else:
                op.free = f.ids
        elif not inner:
            op.batch.append(Factor((batch[0] + nd - n,), f.ids))
        else:
            k = f.axes.index(batch[0])
            rows = np.moveaxis(f.ids, k, 0).reshape(f.ids.shape[k], -1)
            op.head_axis = batch[0] + nd - n
            op.batch.append(Factor((op.head_axis,), ctx.head_ids(rows)))
            if inner == [contract]:
                op.contract = rows
            else:
                op.free = rows
    return op


def couple_contracted(ctx: RuleContext, node: fx.Node, a: Operand, b: Operand) -> None:
    """The contracted channels pair up (head by head when split in heads); a head's row
    is remembered under the id that stands for the head."""
    ca, cb = a.contract, b.contract
    if ca is None or cb is None:
        for c in (ca, cb):
            if c is not None:
                ctx.freeze(c, FreezeReason.UNTRACKED_OPERAND, node)
        return
    if ca.shape != cb.shape or (ca.ndim == 2 and a.head_axis != b.head_axis):
        ctx.freeze(ca, FreezeReason.IRREGULAR_LAYOUT, node)
        ctx.freeze(cb, FreezeReason.IRREGULAR_LAYOUT, node)
        return
    ctx.couple(ca, cb)
    if ca.ndim == 2:
        ctx.head_ids(ca)


def join_batch(ctx: RuleContext, node: fx.Node, ops: list[tuple[Operand, tuple[int, ...]]],
               out_shape: tuple[int, ...]) -> tuple[Factor, ...]:
    """Couple the operands' channels on the broadcast batch axes, as an element-wise op
    would (a head axis meeting a full-size operand without heads is frozen); rows of
    heads that reach no output axis are frozen too."""
    nd = len(out_shape)
    layouts = []
    for op, shape in ops:
        n = len(shape)
        fs = tuple(Factor((f.axes[0] - (nd - n),), f.ids) for f in op.batch)
        layouts.append((ChannelLayout(n - 2, fs), shape[: n - 2]))
    out = join(ctx, node, layouts, out_shape[: nd - 2])
    labeled = {f.axes[0] for f in out}
    for op, _ in ops:
        rows = op.rows
        if rows is not None and op.head_axis not in labeled:
            ctx.freeze(rows, FreezeReason.IRREGULAR_LAYOUT, node)
    return out


def _rows_at(ctx: RuleContext, op: Operand, axis: int) -> np.ndarray | None:
    """(H, w): the operand's channels of each head on output batch axis ``axis``: its
    own rows, or the rows of the heads its ids there stand for."""
    if op.head_axis == axis:
        return op.rows
    ids = [f.ids for f in op.batch if f.axes == (axis,)]
    rows = [ctx.head_rows.get(int(i)) for i in (ids[0] if ids else ())]
    if not rows or any(r is None for r in rows) or len({r.size for r in rows}) > 1:  # type: ignore[union-attr]
        return None
    return np.stack(rows)  # type: ignore[arg-type]


def couple_heads(ctx: RuleContext, x: Operand, y: Operand, joined: tuple[Factor, ...]) -> None:
    """Two operands' head h is one head: where both hold rows of one width, row with row
    (v's head h with q's), so a head is one set of classes (the blocks tie it anyway)."""
    for f in joined:
        rx, ry = _rows_at(ctx, x, f.axes[0]), _rows_at(ctx, y, f.axes[0])
        if rx is not None and ry is not None and rx.shape == ry.shape:
            ctx.couple(rx, ry)


def output(ctx: RuleContext, node: fx.Node, a: Operand, b: Operand,
           joined: tuple[Factor, ...], nd: int) -> tuple[Factor, ...]:
    """The product's factors: plain free channels on their axes; on each batch axis the
    joined ids, or the per-head free channels of one operand (v's (H, D) in
    ``attn @ v``) over that axis and its free axis."""
    sides = ((a, nd - 2), (b, nd - 1))
    out = [Factor((axis,), op.free) for op, axis in sides
           if op.free is not None and op.free.ndim == 1]
    for f in joined:
        per_head = [(op, axis) for op, axis in sides
                    if op.head_axis == f.axes[0] and op.free is not None and op.free.ndim == 2]
        if len(per_head) == 1 and per_head[0][0].free.shape[0] == f.ids.size:  # type: ignore[union-attr]
            op, axis = per_head[0]
            out.append(Factor((f.axes[0], axis), op.free))  # type: ignore[arg-type]
            continue
        for op, _ in per_head:  # both operands' free axes per head, or heads of another count
            ctx.freeze(op.free, FreezeReason.IRREGULAR_LAYOUT, node)  # type: ignore[arg-type]
        out.append(f)
    return tuple(out)


Ref = tuple[ChannelLayout, int]


def _heads_refs(res: ChannelLayout, joined: tuple[Factor, ...]) -> list[Ref]:
    """The output's plain channel axes and its batch axes' channels (the heads)."""
    nd = res.ndim
    refs = [(res, f.axes[0]) for f in res.factors if len(f.axes) == 1]
    for f in joined:
        if not any(g.axes == f.axes for g in res.factors):  # the heads of an (H, D) factor
            refs.append((ChannelLayout(nd, (f,)), f.axes[0]))
    return refs


def _width_ref(rows: np.ndarray, nd: int) -> Ref:
    """The head width of per-head channels ``rows`` (H, D), on axes of their own: with
    ``attention="both"`` (``ctx.head_widths``) it is pruned, and attention's FLOPs
    scale with it (how many positions of a head's width are kept, in any head)."""
    return ChannelLayout(nd + 2, (Factor((nd, nd + 1), rows),)), nd + 1


def declare_flops(ctx: RuleContext, node: fx.Node, res: ChannelLayout,
                  joined: tuple[Factor, ...], contract: np.ndarray | None) -> None:
    """FLOPs scale with the output's plain channel axes, its batch axes' channels (the
    heads) and a plain contracted width; with a head's width D only where it is pruned
    too (``attention="both"``; else D while the head is kept: see module doc)."""
    nd = res.ndim
    refs = _heads_refs(res, joined)
    if contract is not None and contract.ndim == 1:  # an axis of its own, for the count
        refs.append((ChannelLayout(nd + 1, (Factor((nd,), contract),)), nd))
    if ctx.head_widths:
        if contract is not None and contract.ndim == 2:
            refs.append(_width_ref(contract, nd))
        refs += [(res, f.axes[-1]) for f in res.factors if len(f.axes) == 2]
    ctx.flops(node, refs)


def heads_matmul(ctx: RuleContext, node: fx.Node, la: ChannelLayout, lb: ChannelLayout,
                 out_shape: tuple[int, ...]) -> LayoutValue:
    """``q @ kᵀ`` and ``attn @ v`` with channels on batch axes (the heads)."""
    nd = len(out_shape)
    a = operand(ctx, node, la, la.ndim - 1, nd)
    b = operand(ctx, node, lb, lb.ndim - 2, nd)
    couple_contracted(ctx, node, a, b)
    shapes = [ctx.shape(t) for t in node.args[:2]]
    joined = join_batch(ctx, node, [(a, shapes[0]), (b, shapes[1])], out_shape)  # type: ignore[list-item]
    couple_heads(ctx, a, b, joined)
    res = ChannelLayout(nd, output(ctx, node, a, b, joined, nd))
    declare_flops(ctx, node, res, joined, a.contract)
    ctx.mixes(node, (0, la.ndim - 1))
    return res


def _attention_mask(ctx: RuleContext, node: fx.Node,
                    nd: int) -> tuple[Operand, tuple[int, ...]] | None:
    """SDPA's ``attn_mask`` as an operand over the batch axes: one id per head on its
    head axis (a relative position bias passed as the mask) couples to the heads; a
    mask of one row per head that is not tracked keeps them whole; channels on its
    token axes are frozen."""
    mask = ctx.arg(node, 3, "attn_mask")
    lay, shape = ctx.layout(mask), ctx.shape(mask)
    if lay is None or shape is None or len(shape) < 2:
        return None
    op = operand(ctx, node, lay, lay.ndim - 1, nd)
    for part in (op.contract, op.free):
        if part is not None:
            ctx.freeze(part, FreezeReason.IRREGULAR_LAYOUT, node)
    if op.head_axis is not None:
        op.batch = [f for f in op.batch if f.axes != (op.head_axis,)]
    return Operand(batch=op.batch), shape


def _repeat_kv(q: Operand, kvs: tuple[Operand, Operand],
               shapes: list[tuple[int, ...] | None], nd: int) -> list[tuple[int, ...] | None]:
    """SDPA's ``enable_gqa``: kv head g serves query heads g·r .. g·r + r - 1, so k's and
    v's rows are repeated r times, as ``repeat_interleave(r, dim=head axis)`` would
    (their heads are then q's: a kv head is kept or dropped with its r query heads).
    Returns the shapes as seen after that repetition. Operands whose heads do not divide
    q's are left as they are (the head axes then fail to pair, and freeze)."""
    heads = q.rows.shape[0] if q.rows is not None else 0
    shapes = list(shapes)
    for i, op in enumerate(kvs, 1):
        rows, own = op.rows, shapes[i]
        if rows is None or own is None or op.head_axis != q.head_axis or heads % rows.shape[0]:
            continue
        r = heads // rows.shape[0]
        op.contract = None if op.contract is None else np.repeat(op.contract, r, axis=0)
        op.free = None if op.free is None else np.repeat(op.free, r, axis=0)
        op.batch = [Factor(f.axes, np.repeat(f.ids, r)) if f.axes == (op.head_axis,) else f
                    for f in op.batch]
        shape = list(own)
        shape[op.head_axis - (nd - len(shape))] = heads  # type: ignore[operator]
        shapes[i] = tuple(shape)
    return shapes


def heads_attention(ctx: RuleContext, node: fx.Node,
                    lays: tuple[ChannelLayout, ChannelLayout, ChannelLayout],
                    out_shape: tuple[int, ...]) -> LayoutValue:
    """SDPA over q, k, v split in heads: as ``q @ kᵀ`` then ``attn @ v`` with the mask
    added to the logits. q, k and v must each be split in heads of a whole width: the
    op's FLOPs, 2·L·S·(E + Ev) per head, are a product of axis sizes only then. With
    ``enable_gqa`` k and v have fewer heads, each serving a run of q's (see
    :func:`_repeat_kv`)."""
    nd = len(out_shape)
    names = ("query", "key", "value")
    shapes = [ctx.shape(ctx.arg(node, i, n)) for i, n in enumerate(names)]
    q, k, v = (operand(ctx, node, lay, lay.ndim - (2 if i == 2 else 1), nd)
               for i, lay in enumerate(lays))
    for part in (q.free, k.free, v.contract):  # channels on the token axes
        if part is not None:
            ctx.freeze(part, FreezeReason.IRREGULAR_LAYOUT, node)
    q.free = k.free = v.contract = None
    if any(p is None or p.ndim != 2 for p in (q.contract, k.contract, v.free)):
        for lay in lays:
            ctx.freeze_layout(lay, FreezeReason.IRREGULAR_LAYOUT, node)
        return ChannelLayout(nd)
    if ctx.arg(node, 7, "enable_gqa", False):
        shapes = _repeat_kv(q, (k, v), shapes, nd)
    couple_contracted(ctx, node, q, k)
    ops = [(q, shapes[0]), (k, shapes[1]), (v, shapes[2])]
    mask = _attention_mask(ctx, node, nd)
    joined = join_batch(ctx, node, ops + ([mask] if mask else []), out_shape)  # type: ignore[arg-type]
    couple_heads(ctx, q, v, joined)
    res = ChannelLayout(nd, output(ctx, node, Operand(), v, joined, nd))
    if ctx.head_widths:  # q·kᵀ scales with the heads and E, attn·v with the heads and Ev
        e, ev = q.contract.shape[1], v.free.shape[1]  # type: ignore[union-attr]
        heads = _heads_refs(res, joined)
        ctx.flop_parts(node, [(e / (e + ev), [*heads, _width_ref(q.contract, nd)]),  # type: ignore[arg-type]
                              (ev / (e + ev), [*heads, _width_ref(v.free, nd)])])  # type: ignore[arg-type]
    else:
        declare_flops(ctx, node, res, joined, None)
    ctx.mixes(node, (0, lays[0].ndim - 1))
    return res

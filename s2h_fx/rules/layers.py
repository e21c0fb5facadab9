"""Rules for layers with weights: convolutions, linear, embedding, normalisation,
PReLU, as modules and as functions over bare parameters (``F.conv2d(x, self.w)``)."""

from __future__ import annotations

import operator
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from s2h_fx.channels import ChannelLayout, Factor, FreezeReason
from s2h_fx.rules.base import LayoutValue, RuleContext, register_rule
from s2h_fx.rules.heads import heads_attention, heads_matmul, on_batch_axes

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM_C = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
           nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _single(ctx: RuleContext, node: fx.Node, lay: ChannelLayout | None, axis: int) -> Factor | None:
    """The factor on ``axis`` if it lies on that axis alone; others are frozen."""
    if lay is None:
        return None
    f = lay.factor_at(axis)
    if f is not None and f.axes != (axis,):
        ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
        return None
    return f


def _rest(lay: ChannelLayout | None, axis: int) -> tuple[Factor, ...]:
    return () if lay is None else tuple(f for f in lay.factors if axis not in f.axes)


def conv_like(
    ctx: RuleContext, node: fx.Node, x: Any, weight: str, bias: str | None,
    groups: int, transposed: bool = False,
) -> ChannelLayout | None:
    """Shared logic of convolutions given the qualified names of weight and bias."""
    lay, out_shape = ctx.layout(x), ctx.shape(node)
    if out_shape is None:
        return None
    fin = _single(ctx, node, lay, 1)
    for f in _rest(lay, 1):
        ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    out = ctx.param_ids(weight, out_axis, producer=True)
    if bias is not None:
        ctx.couple(ctx.param_ids(bias, 0), out)
    if groups == 1:
        if fin is not None:
            ctx.couple(ctx.param_ids(weight, in_axis), fin.ids)
    elif transposed:
        ctx.freeze(out, FreezeReason.GROUPED_CONV, node)
        if fin is not None:
            ctx.freeze(fin.ids, FreezeReason.GROUPED_CONV, node)
    elif node.name in ctx.tied_groups and fin is not None:
        _tied_groups(ctx, node, fin, weight, out, groups)
    else:
        cin = int(ctx.shape(x)[1])  # type: ignore[index]
        kin, kout = cin // groups, out.size // groups
        if kin != kout or fin is None:
            reason = FreezeReason.GROUPED_CONV if fin is not None else FreezeReason.UNTRACKED_OPERAND
            ctx.freeze(out, reason, node)
            if fin is not None:
                ctx.freeze(fin.ids, reason, node)
        else:
            ctx.couple(fin.ids, out)
            for j in range(groups):
                ctx.block(out[j * kout : (j + 1) * kout])
    res = ChannelLayout(len(out_shape), (Factor((1,), out),))
    refs = [(res, a) for a in range(len(out_shape))]
    if groups == 1 or (node.name in ctx.tied_groups and fin is not None):
        refs.append((lay, 1))  # type: ignore[arg-type]
        ctx.mixes(node, (0, 1))
    ctx.flops(node, refs)
    return res


def _tied_groups(
    ctx: RuleContext, node: fx.Node, fin: Factor, weight: str, out: np.ndarray, groups: int
) -> None:
    """A grouped conv that keeps its ``groups``: every conv group keeps the same channels
    (position i of each group is one channel), on the input and on the output, so a
    channel shuffle's interleaving stays valid. The weight's in-axis (per group) follows
    the input's first group. Chosen by find_channel_groups where whole-group pruning
    would freeze the channels."""
    rows_in, rows_out = fin.ids.reshape(groups, -1), out.reshape(groups, -1)
    for j in range(1, groups):
        ctx.couple(rows_in[j], rows_in[0])
        ctx.couple(rows_out[j], rows_out[0])
    ctx.couple(ctx.param_ids(weight, 1), rows_in[0])


@register_rule(*_CONV, *_CONV_T)
def conv_module(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    m = ctx.module(node)
    t = str(node.target)
    bias = f"{t}.bias" if getattr(m, "bias", None) is not None else None
    return conv_like(ctx, node, node.args[0], f"{t}.weight", bias, int(m.groups),  # type: ignore[arg-type]
                     transposed=isinstance(m, _CONV_T))


# methods that only change a tensor's dtype or device: a weight read through them
# (``self.weight.float()``, DeepSeek's RMSNorm) is still that parameter, sliced alike
_CASTS = frozenset({"float", "half", "bfloat16", "double", "to", "type", "type_as"})


def _dtype_or_device(arg: Any) -> bool:
    """A cast's argument that names a dtype or device: a constant, or ``x.dtype`` /
    ``x.device`` read in the graph."""
    if not isinstance(arg, fx.Node):
        return True
    return (arg.op == "call_function" and arg.target is getattr and len(arg.args) == 2
            and arg.args[1] in ("dtype", "device"))


def _attr_path(arg: Any) -> str | None:
    """The parameter (or buffer) a weight argument reads: a ``get_attr``, possibly
    through dtype or device casts; None where the weight is computed."""
    while isinstance(arg, fx.Node) and arg.op == "call_method" and arg.target in _CASTS:
        others = [*arg.args[1:], *arg.kwargs.values()]
        if arg.target != "type_as" and not all(_dtype_or_device(a) for a in others):
            break  # .to(other_tensor): not a plain cast
        arg = arg.args[0]
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


@register_rule(F.conv1d, F.conv2d, F.conv3d)
def conv_function(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    w, b = _attr_path(ctx.arg(node, 1, "weight")), ctx.arg(node, 2, "bias")
    groups = int(ctx.arg(node, 6, "groups", 1))
    if w is None or (b is not None and _attr_path(b) is None):
        return unknown_weights(ctx, node)
    return conv_like(ctx, node, node.args[0], w, _attr_path(b), groups)


def unknown_weights(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """A weighted op whose weights are computed in the graph: keep everything it touches."""
    for a in node.all_input_nodes:
        ctx.freeze_layout(a.meta.get("s2h_layout"), FreezeReason.UNKNOWN_OP, node)
    ctx.unknown.append(f"{node.name}: weights computed in the graph")
    return ctx.blank(node)


def linear_like(
    ctx: RuleContext, node: fx.Node, x: Any, weight: str, bias: str | None
) -> LayoutValue:
    lay, out_shape = ctx.layout(x), ctx.shape(node)
    if out_shape is None or lay is None:
        return ctx.blank(node)
    last = lay.ndim - 1
    fin = _single(ctx, node, lay, last)
    out = ctx.param_ids(weight, 0, producer=True)
    if bias is not None:
        ctx.couple(ctx.param_ids(bias, 0), out)
    if fin is not None:
        ctx.couple(ctx.param_ids(weight, 1), fin.ids)
    res = ChannelLayout(len(out_shape), _rest(lay, last) + (Factor((last,), out),))
    ctx.flops(node, [(res, a) for a in range(len(out_shape))] + [(lay, last)])
    ctx.mixes(node, (0, last))
    return res


@register_rule(nn.Linear)
def linear_module(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    m, t = cast(nn.Linear, ctx.module(node)), str(node.target)
    bias = f"{t}.bias" if m.bias is not None else None
    return linear_like(ctx, node, node.args[0], f"{t}.weight", bias)


@register_rule(F.linear)
def linear_function(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    w, b = _attr_path(ctx.arg(node, 1, "weight")), ctx.arg(node, 2, "bias")
    if w is None:
        return unknown_weights(ctx, node)
    if b is not None and _attr_path(b) is None:
        return _linear_computed_bias(ctx, node, w, b)
    return linear_like(ctx, node, node.args[0], w, _attr_path(b))


def _linear_computed_bias(ctx: RuleContext, node: fx.Node, weight: str, bias: Any) -> LayoutValue:
    """``F.linear(x, W, b)`` with ``b`` computed in the graph (BEiT's
    ``cat((q_bias, zeros, v_bias))``): the bias is added to the output channels, so its
    channels are the output's, as in an element-wise add. A bias whose channels are
    not tracked keeps the output whole."""
    res = linear_like(ctx, node, node.args[0], weight, None)
    out = ctx.param_ids(weight, 0)
    lay, shape = ctx.layout(bias), ctx.shape(bias)
    f = lay.factor_at(0) if lay is not None and shape == (out.size,) else None
    if f is not None and f.axes == (0,) and f.ids.shape == out.shape:
        ctx.couple(f.ids, out)
    else:
        ctx.freeze(out, FreezeReason.UNTRACKED_OPERAND, node)
        ctx.freeze_layout(lay, FreezeReason.UNTRACKED_OPERAND, node)
    return res


@register_rule(nn.Embedding)
def embedding(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    out_shape = ctx.shape(node)
    if out_shape is None:
        return None
    lay = ctx.layout(node.args[0])
    if lay is not None:
        ctx.freeze_layout(lay, FreezeReason.CHANNEL_INDEXING, node)
    out = ctx.param_ids(f"{node.target}.weight", 1, producer=True)
    return ChannelLayout(len(out_shape), (Factor((len(out_shape) - 1,), out),))


def per_channel_params(
    ctx: RuleContext, node: fx.Node, x: Any, axis: int, params: list[str], block: int = 1
) -> LayoutValue:
    """Parameters of shape (C,) that follow the channels on ``axis`` of ``x``."""
    lay = ctx.layout(x)
    if lay is None:
        return ctx.blank(node)
    axis = axis % lay.ndim
    f = _single(ctx, node, lay, axis)
    if f is not None:
        for p in params:
            ctx.couple(ctx.param_ids(p, 0), f.ids)
        if block > 1:
            for j in range(0, f.ids.size, block):
                ctx.block(f.ids[j : j + block])
    return ChannelLayout(lay.ndim, tuple(g for g in lay.factors if g is f or axis not in g.axes))


def _present(ctx: RuleContext, node: fx.Node, names: list[str]) -> list[str]:
    m = ctx.module(node)
    return [f"{node.target}.{n}" for n in names if getattr(m, n, None) is not None]


@register_rule(*_NORM_C)
def batch_norm_module(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    names = _present(ctx, node, ["weight", "bias", "running_mean", "running_var"])
    return per_channel_params(ctx, node, node.args[0], 1, names)


def _group_block(channels: int, groups: int) -> int:
    """The channels a GroupNorm keeps or drops together: a whole group, whose
    statistics are its own, so that dropping it is exact; with one group (statistics
    over all channels and positions, poolformer's norm) each channel, as LayerNorm's:
    the pruned network normalises over the channels it keeps."""
    return 1 if groups == 1 else channels // groups


@register_rule(nn.GroupNorm)
def group_norm_module(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    m = cast(nn.GroupNorm, ctx.module(node))
    names = _present(ctx, node, ["weight", "bias"])
    return per_channel_params(ctx, node, node.args[0], 1, names,
                              block=_group_block(m.num_channels, m.num_groups))


@register_rule(nn.PReLU)
def prelu_module(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    m = cast(nn.PReLU, ctx.module(node))
    names = _present(ctx, node, ["weight"]) if m.num_parameters > 1 else []
    return per_channel_params(ctx, node, node.args[0], 1, names)


def layer_norm_like(
    ctx: RuleContext, node: fx.Node, x: Any, normalized: tuple[int, ...], params: list[str]
) -> LayoutValue:
    lay = ctx.layout(x)
    if lay is None:
        return ctx.blank(node)
    n = len(normalized)
    if n == 1:
        return per_channel_params(ctx, node, x, -1, params)
    stats = set(range(lay.ndim - n, lay.ndim))
    for f in lay.factors:
        if set(f.axes) & stats:
            ctx.freeze(f.ids, FreezeReason.CHANNEL_REDUCTION, node)
    return lay


@register_rule(nn.LayerNorm)
def layer_norm_module(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    m = ctx.module(node)
    names = _present(ctx, node, ["weight", "bias"])
    return layer_norm_like(ctx, node, node.args[0], tuple(m.normalized_shape), names)  # type: ignore[arg-type]


def _attr_params(ctx: RuleContext, node: fx.Node, slots: list[tuple[int, str]]) -> list[str] | None:
    """Qualified names of parameter args; None if one is computed in the graph."""
    out = []
    for i, name in slots:
        a = ctx.arg(node, i, name)
        if a is None:
            continue
        p = _attr_path(a)
        if p is None:
            return None
        out.append(p)
    return out


@register_rule(F.layer_norm)
def layer_norm_function(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    params = _attr_params(ctx, node, [(2, "weight"), (3, "bias")])
    if params is None:
        return unknown_weights(ctx, node)
    shape = ctx.arg(node, 1, "normalized_shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return layer_norm_like(ctx, node, node.args[0], shape, params)


# RMSNorm, functional: torch's and timm's (its RmsNorm layer calls these; the tracer
# keeps them as calls), all (x, normalized_shape, weight, eps)
RMS_NORM_FUNCTIONS = (F.rms_norm, "timm.layers.fast_norm.rms_norm",
                      "timm.layers.fast_norm.fast_rms_norm")


@register_rule(nn.RMSNorm)
def rms_norm_module(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """As LayerNorm: over the last axis each channel is pruned on its own, and the
    pruned network's root mean square is over the channels it keeps."""
    m = cast(nn.RMSNorm, ctx.module(node))
    names = _present(ctx, node, ["weight"])
    return layer_norm_like(ctx, node, node.args[0], tuple(m.normalized_shape), names)


@register_rule(*RMS_NORM_FUNCTIONS)
def rms_norm_function(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    params = _attr_params(ctx, node, [(2, "weight")])
    if params is None:
        return unknown_weights(ctx, node)
    shape = ctx.arg(node, 1, "normalized_shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return layer_norm_like(ctx, node, node.args[0], shape, params)


@register_rule(F.batch_norm)
def batch_norm_function(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    params = _attr_params(
        ctx, node, [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]
    )
    if params is None:
        return unknown_weights(ctx, node)
    return per_channel_params(ctx, node, node.args[0], 1, params)


@register_rule(F.group_norm)
def group_norm_function(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    params = _attr_params(ctx, node, [(2, "weight"), (3, "bias")])
    if params is None:
        return unknown_weights(ctx, node)
    shape = ctx.shape(node.args[0])
    groups = int(ctx.arg(node, 1, "num_groups"))
    k = _group_block(shape[1], groups) if shape else 1
    return per_channel_params(ctx, node, node.args[0], 1, params, block=k)


@register_rule(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm")
def matmul(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """(..., M, K) @ (..., K, N): K is contracted, so its channels couple. The operands
    may be named (``torch.matmul(input=, other=)``, ``torch.mm(mat2=)``); a result
    written into ``out=`` is not followed: its channels freeze."""
    a = ctx.arg(node, 0, "input")
    b = ctx.arg(node, 1, "mat2" if "mat2" in node.kwargs else "other")
    if "out" in node.kwargs:
        return unknown_weights(ctx, node)
    la, lb, out_shape = ctx.layout(a), ctx.layout(b), ctx.shape(node)
    if la is None or lb is None or out_shape is None or la.ndim < 2 or lb.ndim < 2:
        return unknown_weights(ctx, node)
    if ctx.heads and (on_batch_axes(la) or on_batch_axes(lb)):
        return heads_matmul(ctx, node, la, lb, out_shape)
    la, lb = _batched(la), _batched(lb)
    ka, kb = _single(ctx, node, la, la.ndim - 1), _single(ctx, node, lb, lb.ndim - 2)
    if ka is not None and kb is not None:
        ctx.couple(ka.ids, kb.ids)
    elif ka is not None or kb is not None:
        ctx.freeze((ka or kb).ids, FreezeReason.UNTRACKED_OPERAND, node)  # type: ignore[union-attr]
    nd = len(out_shape)
    out = [Factor((nd - 2,), f.ids) for f in [_single(ctx, node, la, la.ndim - 2)] if f]
    out += [Factor((nd - 1,), f.ids) for f in [_single(ctx, node, lb, lb.ndim - 1)] if f]
    for lay in (la, lb):
        for f in lay.factors:
            if any(x < lay.ndim - 2 for x in f.axes):
                ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
    res = ChannelLayout(nd, tuple(out))
    ctx.flops(node, [(res, x) for x in range(nd)] + [(la, la.ndim - 1)])
    # K is summed over once: its mask goes on one operand only (both would give m * m);
    # the other axes (b's columns: an attention's values) are not summed over here
    ctx.mixes(node, (0, la.ndim - 1))
    return res



def _batched(lay: ChannelLayout) -> ChannelLayout:
    """A tiled factor (one set of channels repeated over heads, see Factor) whose
    repeated axes are batch axes of a matmul or attention (all but the last two)
    is that set of channels on its last axis: each head holds the same channels."""
    out = []
    for f in lay.factors:
        if f.tiled and all(a < lay.ndim - 2 for a in f.axes[:-1]) and f.axes[-1] >= lay.ndim - 2:
            f = f.untiled()
        out.append(f)
    return ChannelLayout(lay.ndim, tuple(out))


@register_rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """softmax(q kᵀ · scale + mask) v over (..., L, E) queries, (..., S, E) keys and
    (..., S, Ev) values: q's and k's E channels are contracted (coupled); v's Ev
    channels pass to the output (they are its channels), a width of their own: with
    separate q, k and v projections the query/key width and the value width prune
    apart (a fused qkv reshaped into (3, H, D) couples them anyway). The op's FLOPs
    are two products, q·kᵀ growing with E and attn·v with Ev, split as the FLOP
    counter counts them. Channels on batch axes (heads) and on the attention mask
    are frozen. The default scale is 1/sqrt(E) of the *unpruned* E: the rule writes
    it into the call (``scale=``), so that pruning E leaves the function as it was
    (the soft, hard and emitted networks all use it)."""
    q, k, v = (ctx.arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    lq, lk, lv = (ctx.layout(t) for t in (q, k, v))
    shape_q, shape_v, out_shape = ctx.shape(q), ctx.shape(v), ctx.shape(node)
    if (lq is None or lk is None or lv is None or shape_q is None or shape_v is None
            or out_shape is None):
        return unknown_weights(ctx, node)
    if ctx.arg(node, 6, "scale") is None:
        node.kwargs = {**node.kwargs, "scale": float(shape_q[-1]) ** -0.5}
        ctx.graph_changed = True
    if ctx.heads and any(on_batch_axes(lay) for lay in (lq, lk, lv)):
        return heads_attention(ctx, node, (lq, lk, lv), out_shape)
    mask = ctx.arg(node, 3, "attn_mask")
    ctx.freeze_layout(ctx.layout(mask), FreezeReason.IRREGULAR_LAYOUT, node)
    lq, lk, lv = _batched(lq), _batched(lk), _batched(lv)
    fq, fk, fv = (_single(ctx, node, lay, lay.ndim - 1) for lay in (lq, lk, lv))
    for lay in (lq, lk, lv):
        for f in lay.factors:
            if any(x != lay.ndim - 1 for x in f.axes):
                ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
    if fq is not None and fk is not None:
        ctx.couple(fq.ids, fk.ids)
    elif fq is not None or fk is not None:  # the other operand's channels are not tracked
        ctx.freeze((fq or fk).ids, FreezeReason.UNTRACKED_OPERAND, node)  # type: ignore[union-attr]
    nd = len(out_shape)
    res = ChannelLayout(nd, (Factor((nd - 1,), fv.ids),) if fv is not None else ())
    e, ev = shape_q[-1], shape_v[-1]
    ctx.flop_parts(node, [(e / (e + ev), [(lq, lq.ndim - 1)]), (ev / (e + ev), [(res, nd - 1)])])
    ctx.mixes(node, (0, lq.ndim - 1))  # q·k sums over E once (values are summed later)
    return res

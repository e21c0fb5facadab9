"""Rules for ops that keep channels where they are: activations, pooling,
element-wise arithmetic (which couples channels), reductions and softmax."""

from __future__ import annotations

import operator
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from s2h_fx.channels import ChannelLayout, Factor, FreezeReason
from s2h_fx.rules.base import LayoutValue, RuleContext, register_rule

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ConstantPad2d,
)

_POINTWISE_FUNCTIONS: list[Any] = [
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, F.selu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, F.pad,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp,
    operator.neg, operator.pos, torch.nn.functional.relu_, torch.square, torch.sqrt,
    torch.sin, torch.cos, torch.log, torch.rsqrt, torch.reciprocal, torch.erf,
]
_POINTWISE_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "clamp",
    "clamp_", "contiguous", "clone", "float", "half", "bfloat16", "double", "to", "type",
    "type_as", "detach", "square", "sqrt", "hardswish", "hardsigmoid", "softplus",
    "sin", "cos", "log", "rsqrt", "reciprocal", "erf",
]

_POINTWISE_EXTRA: list[Any] = []
try:  # torchvision's stochastic depth multiplies by a per-sample scalar
    from torchvision.ops import StochasticDepth, stochastic_depth

    _POINTWISE_EXTRA += [StochasticDepth, stochastic_depth]
except ImportError:  # pragma: no cover
    pass


@register_rule(*_ACTIVATION_MODULES, *_POINTWISE_FUNCTIONS, *_POINTWISE_METHODS, *_POINTWISE_EXTRA)
def pointwise(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    """Channels stay on their axes; other axes may change size (pooling, padding)."""
    src = node.args[0] if node.args else None
    lay = ctx.layout(src)
    out_shape = ctx.shape(node)
    if lay is None or out_shape is None:
        return ctx.blank(node)  # type: ignore[return-value]
    in_shape = ctx.shape(src)
    assert in_shape is not None
    kept = []
    for f in lay.factors:
        if len(out_shape) == len(in_shape) and all(out_shape[a] == in_shape[a] for a in f.axes):
            kept.append(f)
        else:
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
    return ChannelLayout(len(out_shape), tuple(kept))


def join(
    ctx: RuleContext,
    node: fx.Node,
    operands: list[tuple[ChannelLayout, tuple[int, ...]]],
    out_shape: tuple[int, ...],
) -> tuple[Factor, ...]:
    """Broadcast operands to ``out_shape``; couple factors that meet on the same axes.

    Returns the output's factors. Factors meeting a full-size operand whose channels
    are not tracked are frozen, as are factors that overlap on different axes.
    """
    nd = len(out_shape)
    shifted: list[tuple[list[Factor], tuple[int, ...]]] = []
    for lay, shp in operands:
        off = nd - len(shp)
        fs = [Factor(tuple(a + off for a in f.axes), f.ids, f.tiled) for f in lay.factors]
        full = tuple(1 if k < off else shp[k - off] for k in range(nd))
        shifted.append((fs, full))
    out: list[Factor] = []
    for i, (fs, _) in enumerate(shifted):
        for f in fs:
            ok = True
            for j, (gs, full) in enumerate(shifted):
                if j == i:
                    continue
                same = [g for g in gs if g.axes == f.axes]
                clash = [g for g in gs if g.axes != f.axes and set(g.axes) & set(f.axes)]
                if same and same[0].ids.shape != f.ids.shape:
                    # one channel sliced out (gates[:, k:k + 1]) and broadcast over the
                    # other's channels: not the same channels; that one channel is frozen
                    if f.ids.size < same[0].ids.size:
                        ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
                elif same:
                    if j > i:
                        ctx.couple(f.ids, same[0].ids)
                elif clash:
                    ok = _clash(ctx, node, f, clash) and ok
                else:
                    varying = [a for a in f.axes if full[a] == out_shape[a] and out_shape[a] > 1]
                    if varying and not block_within(ctx, f, varying):
                        ctx.freeze(f.ids, FreezeReason.UNTRACKED_OPERAND, node)
            taken = {a for g in out for a in g.axes}
            if ok and not (set(f.axes) & taken) and all(
                out_shape[a] == f.ids.shape[k] for k, a in enumerate(f.axes)
            ):
                out.append(f)
    return tuple(out)


def _clash(ctx: RuleContext, node: fx.Node, f: Factor, clash: list[Factor]) -> bool:
    """``f`` meets factors of another operand on overlapping but different axes. Where
    one lies within the other's axes (a RoPE table's channels over D, from its buffer,
    against q's (H, D)), the larger is kept together along the smaller's axes (see
    :func:`block_within`) and the smaller is frozen: it is never sliced. Else both
    freeze. Whether ``f`` passes to the output."""
    ok = True
    for g in clash:
        if set(g.axes) < set(f.axes) and block_within(ctx, f, list(g.axes)):
            ctx.freeze(g.ids, FreezeReason.WITHIN_BLOCK, node)
        elif set(f.axes) < set(g.axes) and block_within(ctx, g, list(f.axes)):
            ctx.freeze(f.ids, FreezeReason.WITHIN_BLOCK, node)
            ok = False
        else:
            ctx.freeze(g.ids, FreezeReason.IRREGULAR_LAYOUT, node)
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
            ok = False
    return ok


def block_within(ctx: RuleContext, f: Factor, axes: list[int]) -> bool:
    """Keep the ids of a channel axis split in several (``f``, not tiled) together along
    ``axes`` (one block per index of its other axes: a head's D channels), so that an op
    may cut, slice or vary along those axes and pruning never shortens them: a tensor
    whose channels are not tracked may vary along them (RoPE's sin/cos tables over the
    head width of q's (H, D)), broadcast along the others. False (and
    nothing blocked) where no axis would be left to prune along, or ``f`` is tiled (its
    rows are the same channels: one block would hold them all)."""
    if f.tiled or not set(axes) <= set(f.axes) or len(set(axes)) >= len(f.axes):
        return False
    ks = [f.axes.index(a) for a in dict.fromkeys(axes)]
    rows = np.moveaxis(f.ids, ks, list(range(f.ids.ndim - len(ks), f.ids.ndim)))
    for row in rows.reshape(-1, int(np.prod([f.ids.shape[k] for k in ks]))):
        ctx.block(row)
    return True


def _tensor_operands(ctx: RuleContext, node: fx.Node) -> list[tuple[ChannelLayout, tuple[int, ...]]]:
    ops = []
    for a in list(node.args) + list(node.kwargs.values()):
        lay, shp = ctx.layout(a), ctx.shape(a)
        if lay is not None and shp is not None:
            ops.append((lay, shp))
    return ops


@register_rule(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum, torch.where, torch.addcmul, torch.addcdiv,
    operator.pow, operator.ipow, torch.pow,
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum",
    "addcmul", "addcdiv", "addcmul_", "addcdiv_", "pow", "pow_",
)
def elementwise(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    """Tensors combined position by position (broadcast): channels that meet on the same
    axes are coupled. ``addcmul(a, b, c)`` (a + v * b * c) is one such op of three;
    ``x ** 2`` or ``x.pow(2)`` (an RMS norm's square) is one of a single tensor, whose
    channels pass."""
    out_shape = ctx.shape(node)
    if out_shape is None:
        return None
    return ChannelLayout(len(out_shape), join(ctx, node, _tensor_operands(ctx, node), out_shape))


def _dims(arg: Any, ndim: int) -> tuple[int, ...] | None:
    if arg is None:
        return None
    if isinstance(arg, int):
        arg = (arg,)
    return tuple(sorted(d % ndim for d in arg))


@register_rule(torch.amax, torch.amin, "amax", "amin")
def reduction(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    return reduce_over(ctx, node, 1, 2)


@register_rule(torch.max, torch.min, "max", "min")
def extreme(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """``x.max(dim)`` / ``x.min(dim, keepdim)``: values and indices along ``dim`` (global
    max pooling over tokens); channels on other axes pass to both. Over a channel axis,
    or ``x.max()`` over everything, the channels are frozen, as ``amax`` does; with a
    second tensor (``torch.max(a, b)``) it is element-wise."""
    other = ctx.arg(node, 1, "other")
    if isinstance(other, fx.Node) and ctx.shape(other) is not None:
        return elementwise(ctx, node)
    dim = ctx.arg(node, 1, "dim")
    if dim is None:  # the largest of all: a reduction over every axis
        return reduce_over(ctx, node, 1, 2)
    tm = node.meta.get("tensor_meta")
    first = tm[0] if isinstance(tm, (tuple, list)) and tm else None
    shape = tuple(int(d) for d in getattr(first, "shape", None) or ()) or None
    if shape is None or not isinstance(dim, int):  # a 0-d result, or a dim computed
        lay = ctx.layout(ctx.arg(node, 0, "input"))
        if lay is not None:
            ctx.freeze_layout(lay, FreezeReason.IRREGULAR_LAYOUT, node)
        return ctx.blank(node)
    values = reduce_over(ctx, node, 1, 2, out_shape=shape)
    return (values, values) if isinstance(values, ChannelLayout) else ctx.blank(node)


@register_rule(torch.mean, torch.sum, "mean", "sum")
def statistic(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    """A sum over channels leaves the pruned ones out exactly as zeroing them does; a
    mean over channels is a statistic of the kept ones, as LayerNorm's (GRN's mean of
    the channels' norms): the pruned network divides by the channels it keeps."""
    return reduce_over(ctx, node, 1, 2, over_kept=True)


@register_rule(torch.var, torch.std, "var", "std")
def spread(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    """``var`` / ``std`` over channels (timm's ``simple_norm``: x / sqrt(var(x) + eps)) is
    a statistic of the kept channels, as a mean is: the pruned network takes it over the
    channels it keeps (with the same correction). Arguments ``(dim, unbiased, keepdim)``
    or ``(dim, *, correction, keepdim)``; ``x.var(False)`` reduces every axis."""
    if len(node.args) > 1 and isinstance(node.args[1], bool):  # (unbiased,): all axes
        return reduce_over(ctx, node, len(node.args) + 1, len(node.args) + 1, over_kept=True,
                           options=("unbiased", "correction"))
    return reduce_over(ctx, node, 1, 3, over_kept=True, options=("unbiased", "correction"))


@register_rule(torch.norm, "norm")
def norm(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    """``x.norm(p, dim, keepdim)``: a reduction over ``dim`` (GRN's spatial L2 norm)."""
    return reduce_over(ctx, node, 2, 3)


@register_rule(torch.linalg.vector_norm)
def vector_norm(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    """``vector_norm(x, ord, dim, keepdim)``: a reduction over ``dim``."""
    return reduce_over(ctx, node, 2, 3)


def reduce_over(ctx: RuleContext, node: fx.Node, dim_at: int, keep_at: int,
                over_kept: bool = False, options: tuple[str, ...] = (),
                out_shape: tuple[int, ...] | None = None) -> ChannelLayout | None:
    """Reduction over the axes in argument ``dim_at`` (all axes when None), keeping them
    as size 1 when argument ``keep_at`` (``keepdim``) is true. Channels on reduced axes
    are frozen, or with ``over_kept`` reduced over the kept ones (the one factor wholly
    on reduced axes; its mask site is here: two such factors would need two mask sites
    on one argument, so both freeze; keyword arguments other than the dims, keepdim,
    dtype and ``options`` freeze it too); the others pass, their axes renumbered."""
    src = ctx.arg(node, 0, "input")
    lay, shp, out_shape = ctx.layout(src), ctx.shape(src), out_shape or ctx.shape(node)
    if lay is None or shp is None or out_shape is None:
        return ctx.blank(node)  # type: ignore[return-value]
    dims = _dims(ctx.arg(node, dim_at, "dim", node.kwargs.get("axis")), len(shp))
    if dims is None:
        dims = tuple(range(len(shp)))
    keep = bool(ctx.arg(node, keep_at, "keepdim", False))
    # one set of channels summed over at most (one mask site per argument), and only
    # with arguments this rule reads
    reduced = [f for f in lay.factors if set(f.axes) <= set(dims)]
    summed = (reduced[0] if over_kept and len(reduced) == 1
            and set(node.kwargs) <= {"input", "dim", "axis", "keepdim", "dtype", *options}
            else None)
    out = []
    for f in lay.factors:
        if f is summed:
            continue
        if set(f.axes) & set(dims):
            ctx.freeze(f.ids, FreezeReason.CHANNEL_REDUCTION, node)
            continue
        axes = f.axes if keep else tuple(a - sum(d < a for d in dims) for a in f.axes)
        out.append(Factor(axes, f.ids, f.tiled))
    if summed is not None:  # its mask site: the soft network sums m * x
        ctx.mixes(node, *[(0, a) for a in summed.axes])
    return ChannelLayout(len(out_shape), tuple(out))


@register_rule(F.normalize)
def normalize(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    """``F.normalize(x, p, dim)``: x over its p-norm along ``dim`` (Swin V2's cosine
    attention over the head width). A zeroed channel adds nothing to a p-norm with
    p > 0 (nor to the largest magnitude, p = inf), so the pruned network's norm over
    the channels it keeps is the norm of x with the others zeroed: channels pass, on
    every axis. Another p (or ``out=``) freezes the channels along ``dim``."""
    src = node.args[0]
    lay, shp = ctx.layout(src), ctx.shape(src)
    if lay is None or shp is None:
        return ctx.blank(node)  # type: ignore[return-value]
    p = ctx.arg(node, 1, "p", 2.0)
    dims = _dims(ctx.arg(node, 2, "dim", 1), len(shp)) or ()
    if (isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0
            and set(node.kwargs) <= {"p", "dim", "eps", "out"} and node.kwargs.get("out") is None):
        # its mask site: the soft network normalises m * x, so zeroed channels are out
        # of the norm there too
        ctx.mixes(node, *sorted({(0, a) for f in lay.factors if set(f.axes) & set(dims)
                                 for a in f.axes}))
        return lay
    out = []
    for f in lay.factors:
        if set(f.axes) & set(dims):
            ctx.freeze(f.ids, FreezeReason.CHANNEL_REDUCTION, node)
        else:
            out.append(f)
    return ChannelLayout(lay.ndim, tuple(out))


@register_rule(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, "softmax",
               "log_softmax")
def softmax(ctx: RuleContext, node: fx.Node) -> ChannelLayout | None:
    src = node.args[0]
    lay, shp = ctx.layout(src), ctx.shape(src)
    if lay is None or shp is None:
        return ctx.blank(node)  # type: ignore[return-value]
    if node.op == "call_module":
        dim = cast("int | None", ctx.module(node).dim)  # nn.Softmax / nn.LogSoftmax
    else:
        dim = ctx.arg(node, 1, "dim")
    if dim is None:  # torch's implicit softmax dim
        dim = 0 if len(shp) in (0, 1, 3) else 1
    dim = int(dim) % len(shp)
    f = lay.factor_at(dim)
    if f is not None:
        ctx.freeze(f.ids, FreezeReason.CHANNEL_REDUCTION, node)
    return ChannelLayout(len(shp), lay.factors)


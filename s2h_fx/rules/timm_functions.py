"""Rules for functions that timm marks as not traceable (``register_notrace_function``):
the tracer keeps them as single ``call_function`` nodes, so their channel behaviour
is stated here, from their source. Named by qualified name: timm is not imported.

Each rule below is for functions that only rearrange the other axes (windows or
blocks back into an image) and read the channel count from their input
(``C = x.shape[-1]``): the channels pass through on one axis, so pruning them needs
no rewrite. Channels on the other axes (a position embedding's) are frozen.
"""

from __future__ import annotations

from torch import fx

from s2h_fx.channels import ChannelLayout, Factor, FreezeReason
from s2h_fx.rules.base import LayoutValue, RuleContext, register_rule

# (B, T, N, C) or (windows, wh, ww, C) -> (B, H, W, C)
_CHANNELS_LAST = (
    "timm.models.nest.deblockify",
    "timm.models.swin_transformer.window_reverse",
    "timm.models.swin_transformer_v2.window_reverse",
    "timm.models.swin_transformer_v2_cr.window_reverse",
    "timm.models.maxxvit.window_reverse",
    "timm.models.maxxvit.grid_reverse",
    "timm.models.gcvit.window_reverse",
    "timm.models.davit.window_reverse",
)
# (windows, C, wh, ww) -> (B, C, H, W)
_CHANNELS_FIRST = (
    "timm.models.maxxvit.window_reverse_nchw",
    "timm.models.maxxvit.grid_reverse_nchw",
)


def channels_pass_on(ctx: RuleContext, node: fx.Node, axis: int) -> LayoutValue:
    """The first argument's channels on ``axis`` (counted in input and output alike)
    pass to the same axis of the output; channels on other axes are frozen."""
    src = node.args[0] if node.args else None
    lay, shape, out_shape = ctx.layout(src), ctx.shape(src), ctx.shape(node)
    if lay is None or shape is None or out_shape is None:
        return ctx.blank(node)
    a_in, a_out = axis % len(shape), axis % len(out_shape)
    kept = []
    for f in lay.factors:
        if f.axes == (a_in,) and shape[a_in] == out_shape[a_out]:
            kept.append(Factor((a_out,), f.ids))
        else:
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
    for other in node.all_input_nodes[1:]:
        ctx.freeze_layout(other.meta.get("s2h_layout"), FreezeReason.UNTRACKED_OPERAND, node)
    return ChannelLayout(len(out_shape), tuple(kept))


@register_rule(*_CHANNELS_LAST)
def channels_last_passes(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    return channels_pass_on(ctx, node, -1)


@register_rule(*_CHANNELS_FIRST)
def channels_first_passes(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    return channels_pass_on(ctx, node, 1)

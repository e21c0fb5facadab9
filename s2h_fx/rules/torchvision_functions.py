"""Rules for functions that torchvision marks as not traceable (``torch.fx.wrap``): the
tracer keeps them as single ``call_function`` nodes, so their channel behaviour is
stated here, from their source. Named by qualified name. (Swin's window attention is
traced as its ops instead: :mod:`s2h_fx.swin`.)
"""

from __future__ import annotations

import numpy as np
from torch import fx

from s2h_fx.channels import ChannelLayout, Factor, FreezeReason
from s2h_fx.rules.base import LayoutValue, RuleContext, register_rule


@register_rule("torchvision.models.swin_transformer._patch_merging_pad")
def patch_merging_pad(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    """Swin's patch merging: (..., H, W, C) padded to even H and W, then the four 2x2
    phases joined on the channels: (..., H/2, W/2, 4C), each of the C channels four
    times, in four blocks of C. Pruned, each block keeps the same channels (the
    function reads C from its input). Channels on other axes are frozen."""
    src = node.args[0] if node.args else None
    lay, out_shape = ctx.layout(src), ctx.shape(node)
    if lay is None or out_shape is None:
        return ctx.blank(node)
    last = lay.ndim - 1
    kept = []
    for f in lay.factors:
        if f.axes == (last,) and not f.tiled:
            kept.append(Factor((last,), np.concatenate([f.ids] * 4)))
        else:
            ctx.freeze(f.ids, FreezeReason.IRREGULAR_LAYOUT, node)
    return ChannelLayout(len(out_shape), tuple(kept))

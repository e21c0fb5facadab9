"""timm's weight-standardised convolutions (``StdConv2d``, ``ScaledStdConv2d`` and
their ``...Same`` variants: NF-Net, NF-RegNet, NF-ResNet, BiT), kept as leaves and
pruned as convolutions.

Such a layer standardises each output channel's weights over its inputs and kernel
(``F.batch_norm`` on the weight, reshaped to one row per output channel) before the
convolution. Traced through, that computed weight would freeze every channel the
layer touches. As a leaf it is a convolution with one more per-output-channel
parameter (``gain``, on the scaled kind): its output channels are pruned exactly
(each row's statistics are its own), and its input channels as LayerNorm's
channels are: the pruned layer standardises over the inputs it keeps, and that
layer is what S2H trains and what is exported. The constant ``scale`` (fixed at
construction from the full fan-in) stays as it was, in training and in the export.

timm is never imported here: the types are read from ``sys.modules`` when a model
is traced, so a model of timm's has them and no other model pays for them.
"""

from __future__ import annotations

import sys

from torch import fx

from s2h_fx.rules.base import MODULE_RULES, LayoutValue, RuleContext, add_to_registry
from s2h_fx.rules.layers import conv_like

_MODULE = "timm.layers.std_conv"
_NAMES = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def std_conv_types() -> tuple[type, ...]:
    """timm's weight-standardised conv classes if timm is loaded (else ()), each with
    its coupling rule registered."""
    mod = sys.modules.get(_MODULE)
    if mod is None:
        return ()
    types = tuple(getattr(mod, n) for n in _NAMES if isinstance(getattr(mod, n, None), type))
    for t in types:
        if t not in MODULE_RULES:
            add_to_registry([t], std_conv, MODULE_RULES, {}, {})
    return types


def std_conv(ctx: RuleContext, node: fx.Node) -> LayoutValue:
    m = ctx.module(node)
    t = str(node.target)
    bias = f"{t}.bias" if getattr(m, "bias", None) is not None else None
    res = conv_like(ctx, node, node.args[0], f"{t}.weight", bias, int(m.groups))  # type: ignore[arg-type]
    if res is not None and getattr(m, "gain", None) is not None:
        ctx.couple(ctx.param_ids(f"{t}.gain", 0), res.factors[0].ids)
    return res

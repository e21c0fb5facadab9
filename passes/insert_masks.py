"""Pass 3: insert one ChannelMask per prunable group at its channel-mixing sites.

Reads: ``node.meta[S2H_LAYOUT]`` and ``node.meta[S2H_MIXING]`` (find_channel_groups)
and the GroupingResult. Writes: ``call_module`` nodes ``s2h_mask_g{i}(x, site)``
in front of every argument that a conv/linear/matmul sums over, for each
prunable group whose channels that argument carries on the summed axis (a matmul
declares only its first operand: each contracted channel is scaled once); inserted
nodes carry
``node.meta[S2H_MASK_SITE]`` and copy their input's meta.
Postcondition: with every mask value at 1 (``use_fixed`` with the default ones) the
graph computes what it did before; new masks start at full hard width.
Running it twice changes nothing (already masked arguments are skipped). With
``attention="both"`` a head's channels get two masks in a row, their head's and
their width position's: the soft mask is the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import fx

from s2h_fx.channels import S2H_LAYOUT, S2H_MASK_SITE, ChannelLayout, GroupingResult
from s2h_fx.masks import ChannelMask
from s2h_fx.passes.find_channel_groups import S2H_MIXING  # noqa: I001
from s2h_fx.passes.trace_model import drop_dead_code

_COPIED_META = ("tensor_meta", S2H_LAYOUT, "stack_trace", "nn_module_stack", "val")


@dataclass(frozen=True)
class MaskSite:
    group: int
    site: int


def mask_name(group: int) -> str:
    return f"s2h_mask_g{group}"


def insert_masks(gm: fx.GraphModule, grouping: GroupingResult) -> fx.GraphModule:
    for g in grouping.prunable:
        if not hasattr(gm, mask_name(g.index)):
            gm.add_submodule(mask_name(g.index), ChannelMask(g.index, g.size, g.divisor))
    for node in list(gm.graph.nodes):
        for site in node.meta.get(S2H_MIXING, ()):
            i, axis = site if isinstance(site, tuple) else (site, None)
            arg = node.args[i] if i < len(node.args) else None
            if not isinstance(arg, fx.Node) or S2H_MASK_SITE in arg.meta:
                continue
            lay = arg.meta.get(S2H_LAYOUT)
            if not isinstance(lay, ChannelLayout):
                continue
            if axis is not None:  # only the channels summed over on that axis
                f = lay.factor_at(axis % lay.ndim)
                lay = ChannelLayout(lay.ndim, (f,) if f is not None else ())
            new = _mask_chain(gm, node, arg, lay, grouping)
            if new is not arg:
                node.update_arg(i, new)
    drop_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


def _mask_chain(
    gm: fx.GraphModule, user: fx.Node, arg: fx.Node, lay: ChannelLayout, grouping: GroupingResult
) -> fx.Node:
    cur = arg
    for f, (group_of, class_of) in ((f, lab) for f in lay.factors for lab in grouping.layers()):
        groups = group_of[f.ids]
        for g in np.unique(groups[groups >= 0]).tolist():
            index = np.where(groups == g, class_of[f.ids], -1)
            order = sorted(range(len(f.axes)), key=lambda k: f.axes[k])
            index = np.transpose(index, order)
            shape = [1] * lay.ndim
            for k in order:
                shape[f.axes[k]] = f.ids.shape[k]
            mask: ChannelMask = gm.get_submodule(mask_name(g))  # type: ignore[assignment]
            site = mask.add_site(index.reshape(shape))
            with gm.graph.inserting_before(user):
                new = gm.graph.call_module(mask_name(g), (cur, site))
            for key in _COPIED_META:
                if key in arg.meta:
                    new.meta[key] = arg.meta[key]
            new.meta[S2H_MASK_SITE] = MaskSite(g, site)
            cur = new
    return cur
